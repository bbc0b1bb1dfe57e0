"""Evaluation: accuracy / macro-F1 / loss (classification); loss, perplexity, BLEU, ROUGE-L (generation).

BLEU and ROUGE-L come from the maintained packages (sacrebleu, rouge-score), not hand-written metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from core.batching import Encoded, Template, collate, encode_generation, length_chunks
from core.data import Dataset
from core.heads import Head
from core.objective import autocast_for, classification_losses, completion_losses
from core.prompting import PromptLearner, attention_mask_4d


def macro_f1(pred: Sequence[int], gold: Sequence[int], num_labels: int) -> float:
    """Unweighted mean over classes of F1 (a class never predicted nor present counts as F1 = 0)."""
    scores = []
    for k in range(num_labels):
        tp = sum(1 for p, g in zip(pred, gold) if p == k and g == k)
        fp = sum(1 for p, g in zip(pred, gold) if p == k and g != k)
        fn = sum(1 for p, g in zip(pred, gold) if p != k and g == k)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_labels


@torch.no_grad()
def predict(learner: PromptLearner, head: Head, rows: Sequence[Encoded], *, device: torch.device,
            batch_rows: int = 64, use_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits [N, K] (in ``rows`` order) and per-example losses [N]."""
    pad = learner.base.tokenizer.pad_token_id
    logits: list[torch.Tensor | None] = [None] * len(rows)
    losses = torch.zeros(len(rows))
    for chunk in length_chunks(range(len(rows)), [len(r) for r in rows], max_rows=batch_rows):
        batch = collate([rows[i] for i in chunk], pad_id=pad).to(device)
        with autocast_for(device):
            if use_prompt:
                loss, out = classification_losses(learner, head, batch)
            else:
                hidden = learner.hidden(batch.input_ids, batch.attention_mask, use_prompt=False)
                out = head.logits(hidden, batch).float()
                assert batch.labels is not None
                loss = torch.nn.functional.cross_entropy(out, batch.labels, reduction="none")
        for j, i in enumerate(chunk):
            logits[i] = out[j].float().cpu()
            losses[i] = float(loss[j])
    return torch.stack([t for t in logits if t is not None]), losses


def classification_metrics(learner: PromptLearner, head: Head, rows: Sequence[Encoded], *, num_labels: int,
                           device: torch.device, use_prompt: bool = True) -> dict[str, float]:
    logits, losses = predict(learner, head, rows, device=device, use_prompt=use_prompt)
    pred = logits.argmax(-1).tolist()
    gold = [int(r.label) for r in rows if r.label is not None]
    return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold),
            "macro_f1": macro_f1(pred, gold, num_labels), "loss": float(losses.mean()), "examples": len(gold)}


@torch.no_grad()
def completion_loss(learner: PromptLearner, rows: Sequence[Encoded], *, device: torch.device,
                    batch_rows: int = 32) -> tuple[float, int]:
    """Token-weighted mean completion cross-entropy over ``rows`` and the number of target tokens."""
    pad = learner.base.tokenizer.pad_token_id
    total, tokens = 0.0, 0
    for chunk in length_chunks(range(len(rows)), [len(r) for r in rows], max_rows=batch_rows):
        batch = collate([rows[i] for i in chunk], pad_id=pad).to(device)
        with autocast_for(device):
            per_example, counts = completion_losses(learner, batch)
        total += float((per_example * counts).sum())
        tokens += int(counts.sum())
    return total / max(tokens, 1), tokens


@torch.no_grad()
def greedy_generate(learner: PromptLearner, prompts: Sequence[Encoded], *, max_new_tokens: int,
                    device: torch.device, batch_rows: int = 16) -> list[list[int]]:
    """Greedy decoding with the prefix / soft prompt; returns new token ids per prompt (EOS excluded)."""
    tok = learner.base.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    lm_head: Any = learner.base.model.get_output_embeddings()
    impl = getattr(learner.base.config, "_attn_implementation", "sdpa") or "sdpa"
    dtype = next(learner.backbone.parameters()).dtype
    out: list[list[int]] = [[] for _ in prompts]
    for chunk in length_chunks(range(len(prompts)), [len(p) for p in prompts], max_rows=batch_rows):
        batch = collate([prompts[i] for i in chunk], pad_id=pad, left_pad=True).to(device)
        b, p = batch.input_ids.shape[0], learner.num_virtual_tokens
        mask = batch.attention_mask.bool()
        # First pass: the prompt through the full prefix path, keeping the cache it fills.
        states = learner.prompt_states(b)
        ones = torch.ones(b, p, dtype=torch.bool, device=device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        kv_valid = torch.cat([ones, mask], dim=1)
        if learner.tuning == "prefix":
            cache = learner.prefix_cache(states.to(dtype))
            am = attention_mask_4d(kv_valid, q_len=mask.shape[1], causal=True, attn_impl=impl, dtype=dtype)
            res = learner.backbone(input_ids=batch.input_ids, attention_mask=am, position_ids=positions,
                                   past_key_values=cache, use_cache=True)
            offset = 0
        else:
            cache = DynamicCache()
            embeds = torch.cat([states.to(dtype), learner.backbone.get_input_embeddings()(batch.input_ids)], 1)
            am = attention_mask_4d(kv_valid, q_len=p + mask.shape[1], causal=True, attn_impl=impl, dtype=dtype)
            pos = torch.cat([torch.arange(p, device=device).expand(b, p), positions + p], dim=1)
            res = learner.backbone(inputs_embeds=embeds, attention_mask=am, position_ids=pos,
                                   past_key_values=cache, use_cache=True)
            offset = p
        next_pos = positions[:, -1] + 1 + offset
        done = torch.zeros(b, dtype=torch.bool, device=device)
        hidden_last = res.last_hidden_state[:, -1]
        for _ in range(max_new_tokens):
            nxt = lm_head(hidden_last).argmax(-1)  # [b]
            for j, i in enumerate(chunk):
                if not done[j] and int(nxt[j]) != eos:
                    out[i].append(int(nxt[j]))
            done |= nxt == eos
            if bool(done.all()):
                break
            kv_valid = torch.cat([kv_valid, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
            am = attention_mask_4d(kv_valid, q_len=1, causal=True, attn_impl=impl, dtype=dtype)
            res = learner.backbone(input_ids=nxt[:, None], attention_mask=am, position_ids=next_pos[:, None],
                                   past_key_values=cache, use_cache=True)
            hidden_last = res.last_hidden_state[:, -1]
            next_pos = next_pos + 1
    return out


def generation_metrics(learner: PromptLearner, dataset: Dataset, *, template: Template, max_length: int,
                       max_new_tokens: int, device: torch.device) -> dict[str, Any]:
    """Completion loss and perplexity over every (prompt, reference) row; BLEU / ROUGE-L of greedy outputs
    per unique prompt against all of its references (E2E has several per meaning representation)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    tok = learner.base.tokenizer
    rows = encode_generation(dataset.examples, tok, template=template, max_length=max_length)
    loss, tokens = completion_loss(learner, rows, device=device)
    refs = dataset.refs or {}
    prompts = list(refs)
    from core.data import Example
    enc = encode_generation([Example(p) for p in prompts], tok, template=template, max_length=max_length,
                            with_completion=False)
    outputs = [str(tok.decode(ids, skip_special_tokens=True)).strip()
               for ids in greedy_generate(learner, enc, max_new_tokens=max_new_tokens, device=device)]
    width = max(len(refs[p]) for p in prompts)
    ref_streams = [[refs[p][k] if k < len(refs[p]) else refs[p][0] for p in prompts] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(outputs, ref_streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(max(scorer.score(r, o)["rougeL"].fmeasure for r in refs[p]) for p, o in zip(prompts, outputs))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": tokens,
            "bleu": bleu, "rouge_l": 100.0 * rouge / max(len(prompts), 1), "prompts": len(prompts),
            "samples": [{"prompt": p, "output": o} for p, o in list(zip(prompts, outputs))[:5]]}
