"""Per-example losses. Each returns a [B] tensor: DP-SGD clips per example, so nothing may average over the
batch here (transformers' built-in causal-LM loss averages over the batch's tokens, which is why we compute
the loss ourselves)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from core.batching import IGNORE, Batch
from core.heads import Head
from core.prompting import Hidden, PromptLearner


def classification_losses(learner: PromptLearner, head: Head, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per example [B] and the logits [B, K]."""
    hidden = learner.hidden(batch.input_ids, batch.attention_mask)
    logits = head.logits(hidden, batch).float()
    assert batch.labels is not None
    return F.cross_entropy(logits, batch.labels, reduction="none"), logits


def completion_losses(learner: PromptLearner, batch: Batch,
                      hidden: Hidden | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy over each example's completion tokens [B], and their counts [B].

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
    return sums / counts.clamp(min=1.0), counts
