"""Tokenisation with templates, Poisson sampling, and dynamic-padding batches.

Batches are never padded to a fixed maximum: each physical batch pads to its own longest row, and rows are
length-sorted before chunking (length bucketing), which ran ~10x faster than padding to 128 on SST-2.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from core.data import Example

IGNORE = -100


@dataclass(frozen=True)
class Template:
    """How an example becomes tokens. ``{text}`` is the input; ``{choices}`` the label words, or-joined;
    ``{mask}`` the tokenizer's mask token (MLM heads). The answer position is the last token (decoders) or
    the mask token (MLM)."""

    text: str = "{text}"
    answer: str = "none"  # "none" (pooled head), "last" (next-token head), "mask" (MLM head)


@dataclass(frozen=True)
class Encoded:
    """One tokenised example. ``targets`` (generation) has IGNORE except on completion tokens (shifted)."""

    ids: tuple[int, ...]
    label: int | None = None
    answer_pos: int | None = None
    targets: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Batch:
    """A padded physical batch. ``input_ids``/``attention_mask``/``targets`` [B, L]; ``labels``/``answer_pos`` [B]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    answer_pos: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.labels),  # type: ignore[arg-type]
                     mv(self.answer_pos), mv(self.targets))


def _specials(tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text (e.g. [CLS] / [SEP])."""
    probe = "hello world"
    core = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe, add_special_tokens=True)["input_ids"]
    for off in range(len(full) - len(core) + 1):
        if full[off: off + len(core)] == core:
            return full[:off], full[off + len(core):]
    return [], []


def encode_classification(examples: Sequence[Example], tok: PreTrainedTokenizerBase, *, template: Template,
                          choices: Sequence[str], max_length: int) -> list[Encoded]:
    """Tokenise classification rows; the text (never the template) is truncated to fit ``max_length``."""
    filled = template.text.replace("{choices}", " or ".join(choices))
    if "{mask}" in filled:
        filled = filled.replace("{mask}", tok.mask_token)
    before, _, after = filled.partition("{text}")
    pre = tok(before, add_special_tokens=False)["input_ids"] if before else []
    post = tok(after, add_special_tokens=False)["input_ids"] if after else []
    lead, trail = _specials(tok)
    room = max(max_length - len(lead) - len(trail) - len(pre) - len(post), 1)
    texts = tok([e.text for e in examples], add_special_tokens=False, truncation=True, max_length=room)
    out = []
    for ex, text_ids in zip(examples, texts["input_ids"]):
        body = pre + list(text_ids) + post
        pos: int | None = None
        if template.answer == "last":
            # The answer is predicted right after the template's last token: no trailing specials (EOS).
            ids = lead + body
            pos = len(ids) - 1
        else:
            ids = lead + body + trail
            if template.answer == "mask":
                pos = ids.index(tok.mask_token_id)
        out.append(Encoded(tuple(ids), label=ex.label, answer_pos=pos))
    return out


def encode_generation(examples: Sequence[Example], tok: PreTrainedTokenizerBase, *, template: Template,
                      max_length: int, with_completion: bool = True) -> list[Encoded]:
    """Tokenise prompt + completion + EOS; only completion tokens (and EOS) are targets (loss on completion)."""
    eos = tok.eos_token_id
    lead, _ = _specials(tok)
    out = []
    for ex in examples:
        prompt = template.text.replace("{text}", ex.text)
        p_ids = lead + tok(prompt, add_special_tokens=False)["input_ids"]
        if not with_completion:
            out.append(Encoded(tuple(p_ids[-max_length:])))
            continue
        c_ids = tok(" " + (ex.completion or ""), add_special_tokens=False)["input_ids"]
        c_ids += [eos] if eos is not None else []
        c_ids = c_ids[: max(max_length // 2, max_length - len(p_ids))]
        p_ids = p_ids[-(max_length - len(c_ids)):] if len(p_ids) + len(c_ids) > max_length else p_ids
        ids = p_ids + c_ids
        # targets[i] is the token predicted at position i (i.e. ids[i+1]) when that token is a completion token
        targets = [IGNORE] * (len(p_ids) - 1) + c_ids + [IGNORE]
        out.append(Encoded(tuple(ids), targets=tuple(targets)))
    return out


def collate(rows: Sequence[Encoded], *, pad_id: int, left_pad: bool = False) -> Batch:
    """Pad ``rows`` to their own longest length (dynamic padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long) if rows[0].targets is not None else None
    answer = []
    for i, r in enumerate(rows):
        n = len(r)
        start = width - n if left_pad else 0
        ids[i, start: start + n] = torch.tensor(r.ids)
        mask[i, start: start + n] = 1
        if targets is not None and r.targets is not None:
            targets[i, start: start + n] = torch.tensor(r.targets)
        answer.append((r.answer_pos or 0) + start)
    labels = torch.tensor([r.label for r in rows]) if rows[0].label is not None else None
    answer_pos = torch.tensor(answer) if rows[0].answer_pos is not None else None
    return Batch(ids, mask, labels, answer_pos, targets)


def poisson_sample(n: int, *, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a Poisson-sampled logical batch: each example independently with probability q (may be empty)."""
    return np.flatnonzero(rng.random(n) < sample_rate)


def length_chunks(indices: Sequence[int] | np.ndarray, lengths: Sequence[int], *, max_rows: int,
                  max_tokens: int | None = None) -> Iterator[list[int]]:
    """Split ``indices`` into length-sorted physical batches of at most ``max_rows`` rows (and, if given,
    ``max_tokens`` padded tokens), so each batch pads only to similar lengths."""
    order = sorted(indices, key=lambda i: lengths[i])
    chunk: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted ascending: the newest row is the longest
        if chunk and (len(chunk) >= max_rows or (max_tokens and longest * (len(chunk) + 1) > max_tokens)):
            yield chunk
            chunk = []
        chunk.append(int(i))
    if chunk:
        yield chunk
