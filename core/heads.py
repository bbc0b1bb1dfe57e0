"""Classification heads that start pretrained: label verbalizers, with a learned head only as a fallback.

Why: under DP, a randomly initialised head stays at chance for many steps, and under flat clipping its
per-example gradient (norm ~1) eats the clipping budget the prefix needs (~0.02). The paper classifies
through the pretrained MLM head with label words (LM-BFF); we do the same in spirit for each model family:

- ``embedding``: cosine between the mean-pooled sentence and the embedding of "It was {label}." (sentence
  encoders such as all-MiniLM, which were trained for exactly this geometry). No trainable parameters.
- ``mlm``: the MLM head's logits of the label words at the ``[MASK]`` of "{text} It was [MASK].".
- ``lm``: a decoder's next-token logits of " {label}" after the prompt.
- ``linear``: zero-initialised linear layer on pooled features (labels without names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.batching import Batch, Template, collate, encode_classification
from core.data import Example
from core.models import BaseModel
from core.prompting import Hidden, PromptLearner

HEAD_KINDS = ("embedding", "mlm", "lm", "linear")
ENCODER_ANCHOR = "It was {label}."
MLM_TEMPLATE = "{text} It was {mask}."
DECODER_TEMPLATE = "Text: {text}\nAnswer ({choices}):"
# Cosine similarities live in a narrow band; a fixed temperature turns them into usable logits
# (sentence-transformers trains all-MiniLM with scale 20).
EMBEDDING_SCALE = 20.0


def mean_pool(hidden: Hidden) -> torch.Tensor:
    """Mean of the real tokens' states: [B, L, D] -> [B, D]."""
    m = hidden.mask.unsqueeze(-1).to(hidden.states.dtype)
    return (hidden.states * m).sum(1) / m.sum(1).clamp(min=1.0)


def pool(hidden: Hidden, kind: str) -> torch.Tensor:
    if kind == "mean":
        return mean_pool(hidden)
    if kind == "last":
        last = hidden.mask.long().sum(1) - 1
        return hidden.states[torch.arange(hidden.states.shape[0]), last]
    return hidden.states[:, 0]


class Head(nn.Module):
    """Maps hidden states of a batch to class logits [B, K]."""

    kind: str = ""
    template: Template = Template()

    def logits(self, hidden: Hidden, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "template": self.template.text, "answer": self.template.answer}


class EmbeddingHead(Head):
    kind = "embedding"

    def __init__(self, anchors: torch.Tensor, *, pooling: str, scale: float = EMBEDDING_SCALE) -> None:
        super().__init__()
        self.anchors: torch.Tensor
        self.register_buffer("anchors", F.normalize(anchors, dim=-1))  # [K, D]
        self.pooling, self.scale = pooling, scale

    def logits(self, hidden: Hidden, batch: Batch) -> torch.Tensor:
        z = F.normalize(pool(hidden, self.pooling), dim=-1)
        return self.scale * z @ self.anchors.to(z.dtype).T


class LabelWordHead(Head):
    """Logits of the label words at the answer position, through the (frozen) pretrained LM/MLM head."""

    def __init__(self, lm_head: nn.Module, word_ids: Sequence[int], *, kind: str, template: Template) -> None:
        super().__init__()
        self.kind, self.template = kind, template
        self.lm_head: list[Any] = [lm_head]  # a list: not registered, so the frozen head is never hooked or saved twice
        self.register_buffer("word_ids", torch.tensor(list(word_ids)))

    def logits(self, hidden: Hidden, batch: Batch) -> torch.Tensor:
        assert batch.answer_pos is not None
        h = hidden.states[torch.arange(hidden.states.shape[0], device=hidden.states.device), batch.answer_pos]
        return self.lm_head[0](h)[:, self.word_ids]


class LinearHead(Head):
    kind = "linear"

    def __init__(self, dim: int, num_labels: int, *, pooling: str) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.pooling = pooling

    def logits(self, hidden: Hidden, batch: Batch) -> torch.Tensor:
        return self.linear(pool(hidden, self.pooling))


def _lm_head_module(base: BaseModel) -> Any:
    for attr in ("cls", "lm_head"):  # BERT-style MLM head, RoBERTa/Llama-style head
        mod = getattr(base.model, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    out = base.model.get_output_embeddings()
    if out is None:
        raise ValueError(f"{base.name} has no LM head")
    return out


def _first_token(base: BaseModel, word: str, *, leading_space: bool) -> int:
    ids = base.tokenizer((" " if leading_space else "") + word, add_special_tokens=False)["input_ids"]
    return int(ids[0])


@torch.no_grad()
def _anchors(learner: PromptLearner, label_names: Sequence[str], pooling: str) -> torch.Tensor:
    tok = learner.base.tokenizer
    rows = encode_classification([Example(ENCODER_ANCHOR.replace("{label}", n), 0) for n in label_names], tok,
                                 template=Template(), choices=label_names, max_length=64)
    batch = collate(rows, pad_id=tok.pad_token_id).to(next(learner.backbone.parameters()).device)
    return pool(learner.hidden(batch.input_ids, batch.attention_mask, use_prompt=False), pooling)


def build_head(learner: PromptLearner, *, num_labels: int, label_names: Sequence[str] | None,
               template: str | None = None, kind: str | None = None) -> Head:
    """Pick and build the classification head for this model family (see module docstring).

    Args:
        learner: the prompt learner (its frozen base computes the anchors / provides the LM head).
        num_labels: K.
        label_names: verbalizer words per label index, or None (then only ``linear`` is possible).
        template: overrides the input template (``{text}``, ``{choices}``, ``{mask}``).
        kind: force a head kind; default: ``lm`` for decoders, ``mlm`` for encoders with an MLM head,
            ``embedding`` for pooled encoders, ``linear`` without label names.
    """
    base = learner.base
    if kind is None:
        if not label_names:
            kind = "linear"
        elif base.family == "decoder":
            kind = "lm"
        elif base.has_lm_head and base.pooling != "mean":
            kind = "mlm"
        else:
            kind = "embedding"
    if kind != "linear" and not label_names:
        raise ValueError(f"head {kind!r} needs label names")
    names = list(label_names or [])
    if kind == "embedding":
        pooling = "mean" if base.pooling in ("mean", "last") and base.family == "encoder" else base.pooling
        head: Head = EmbeddingHead(_anchors(learner, names, pooling), pooling=pooling)
        head.template = Template(template or "{text}")
        return head
    if kind == "mlm":
        return LabelWordHead(_lm_head_module(base), [_first_token(base, n, leading_space=False) for n in names],
                             kind="mlm", template=Template(template or MLM_TEMPLATE, "mask"))
    if kind == "lm":
        return LabelWordHead(_lm_head_module(base), [_first_token(base, n, leading_space=True) for n in names],
                             kind="lm", template=Template(template or DECODER_TEMPLATE, "last"))
    dim = int(base.config.hidden_size)
    head = LinearHead(dim, num_labels, pooling=base.pooling)
    head.template = Template(template or "{text}")
    return head
