"""Per-example losses. Each returns a [B] tensor: DP-SGD clips per example, so nothing may average over the
batch here (transformers' built-in causal-LM loss averages over the batch's tokens, which is why we compute
the loss ourselves)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from core.batching import IGNORE, Batch, Encoded, collate, length_chunks
from core.heads import Head
from core.prompting import Hidden, PromptLearner


def autocast_for(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing on CPU: the same code path either way."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@dataclass(frozen=True)
class Distill:
    """Cross-model flatness (Privacy-Flat §3.3): pull the prompt states toward a non-private teacher's.

    ``teacher`` [P, F] are the teacher's prompt states; ``columns`` [F] (or None) keeps only the kept layers'
    columns. ``lam``·‖P_i − P_teacher‖₂ (not squared, as the paper) is added to *every example's* loss and is
    computed from that example's own prompt-state activation, so the per-sample hooks see it and it is
    clipped with the example (the paper's ghost-clipping path let it escape the clip). ``logit_weight`` adds
    KL(teacher ‖ student) on the task outputs (an extra forward pass with the teacher's states).
    """

    teacher: torch.Tensor
    columns: torch.Tensor | None
    lam: float
    logit_weight: float = 0.0


def example_losses(learner: PromptLearner, head: Head | None, batch: Batch,
                   distill: Distill | None = None) -> torch.Tensor:
    """The per-example training loss [B]: task loss, plus the distillation terms when ``distill`` is set."""
    hidden = learner.hidden(batch.input_ids, batch.attention_mask)
    if head is not None:
        task, logits = classification_losses(learner, head, batch, hidden=hidden)
    else:
        task, logits = completion_losses(learner, batch, hidden=hidden, with_logits=True)
    if distill is None:
        return task
    assert hidden.prompt is not None
    diff = hidden.prompt.float() - distill.teacher.to(hidden.prompt.device).float()  # [B, P, F]
    if distill.columns is not None:
        diff = diff * distill.columns.to(diff.device)
    loss = task + distill.lam * (diff.pow(2).flatten(1).sum(1) + 1e-12).sqrt()
    if distill.logit_weight > 0:
        b = batch.input_ids.shape[0]
        with torch.no_grad():
            t_states = distill.teacher.to(hidden.prompt.device).unsqueeze(0).expand(b, -1, -1)
            t_hidden = learner.hidden(batch.input_ids, batch.attention_mask, states=t_states)
            t_logits = head.logits(t_hidden, batch).float() if head is not None else \
                completion_losses(learner, batch, hidden=t_hidden, with_logits=True)[1]
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                      reduction="none").sum(-1)  # [B] or [T]
        if head is None:  # token KLs back to examples: mean over each example's completion tokens
            assert batch.targets is not None
            rows = (batch.targets != IGNORE).nonzero(as_tuple=True)[0]
            kl = torch.zeros(b, device=kl.device).index_add_(0, rows, kl) / \
                torch.zeros(b, device=kl.device).index_add_(0, rows, torch.ones_like(kl)).clamp(min=1.0)
        loss = loss + distill.logit_weight * kl
    return loss


def classification_losses(learner: PromptLearner, head: Head, batch: Batch,
                          hidden: Hidden | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per example [B] and the logits [B, K]."""
    if hidden is None:
        hidden = learner.hidden(batch.input_ids, batch.attention_mask)
    logits = head.logits(hidden, batch).float()
    assert batch.labels is not None
    return F.cross_entropy(logits, batch.labels, reduction="none"), logits


def completion_losses(learner: PromptLearner, batch: Batch, hidden: Hidden | None = None, *,
                      with_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy over each example's completion tokens [B], and their counts [B] (or, with
    ``with_logits``, the target positions' logits [T, V] in example order).

    Only the target positions go through the LM head ([T, V] instead of [B, L, V]).
    """
    assert batch.targets is not None
    if hidden is None:
        hidden = learner.hidden(batch.input_ids, batch.attention_mask)
    where = batch.targets != IGNORE  # [B, L]
    rows = where.nonzero(as_tuple=True)[0]  # example index of each target token [T]
    lm_head: Any = learner.base.model.get_output_embeddings()
    logits = lm_head(hidden.states[where]).float()  # [T, V]
    token_loss = F.cross_entropy(logits, batch.targets[where], reduction="none")  # [T]
    b = batch.input_ids.shape[0]
    counts = torch.zeros(b, device=token_loss.device).index_add_(0, rows, torch.ones_like(token_loss))
    sums = torch.zeros(b, device=token_loss.device).index_add_(0, rows, token_loss)
    return sums / counts.clamp(min=1.0), logits if with_logits else counts


def probe_loss(learner: PromptLearner, head: Head | None, rows: Sequence[Encoded], *,
               device: torch.device) -> Callable[[], torch.Tensor]:
    """A closure giving the mean task loss over ``rows`` at the current weights (differentiable): the loss
    that flatness measurement and layer selection probe. Batches are built once."""
    pad = learner.base.tokenizer.pad_token_id
    batches = [collate([rows[i] for i in chunk], pad_id=pad).to(device)
               for chunk in length_chunks(range(len(rows)), [len(r) for r in rows], max_rows=32)]

    def loss_fn() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for b in batches:
            with autocast_for(device):
                per = (classification_losses(learner, head, b) if head is not None
                       else completion_losses(learner, b))[0]
            total = total + per.float().sum()
        return total / max(len(rows), 1)

    return loss_fn
