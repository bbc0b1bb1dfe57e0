"""Empirical privacy: a loss-threshold membership-inference audit (Yeom et al. 2018).

The attacker scores each example by its negative loss under the tuned model; the AUC of telling training
members from never-trained non-members (a holdout split off *before* anything trains) is reported. 0.5 is
chance. This is evidence, not a guarantee: it measures one attack, and a DP bound limits every attack.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from core.batching import Encoded, collate, length_chunks
from core.heads import Head
from core.objective import classification_losses, completion_losses
from core.prompting import PromptLearner


@torch.no_grad()
def example_losses(learner: PromptLearner, head: Head | None, rows: Sequence[Encoded], *,
                   device: torch.device) -> list[float]:
    """Task loss of every row, in order."""
    out = [0.0] * len(rows)
    pad = learner.base.tokenizer.pad_token_id
    for chunk in length_chunks(range(len(rows)), [len(r) for r in rows], max_rows=64):
        batch = collate([rows[i] for i in chunk], pad_id=pad).to(device)
        per = (classification_losses(learner, head, batch) if head is not None
               else completion_losses(learner, batch))[0]
        for i, v in zip(chunk, per.float().tolist()):
            out[i] = v
    return out


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """P(score_member > score_non_member) + ½·P(tie): the Mann-Whitney AUC of the two score samples."""
    pairs = [(s, 1) for s in members] + [(s, 0) for s in non_members]
    pairs.sort(key=lambda x: x[0])
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        rank_sum += sum(1 for k in range(i, j) if pairs[k][1]) * (i + j + 1) / 2
        i = j
    m, n = len(members), len(non_members)
    return (rank_sum - m * (m + 1) / 2) / (m * n)


def membership_audit(learner: PromptLearner, head: Head | None, members: Sequence[Encoded],
                     non_members: Sequence[Encoded], *, device: torch.device, seed: int) -> dict[str, Any]:
    """Loss-threshold attack AUC on as many members (sampled with ``seed``) as there are non-members."""
    picked = random.Random(seed).sample(list(members), min(len(members), len(non_members)))
    m_loss = example_losses(learner, head, picked, device=device)
    n_loss = example_losses(learner, head, non_members, device=device)
    return {"attack": "loss threshold", "mia_auc": auc([-x for x in m_loss], [-x for x in n_loss]),
            "members": len(picked), "non_members": len(non_members),
            "member_loss": sum(m_loss) / len(m_loss), "non_member_loss": sum(n_loss) / len(n_loss),
            "note": "computed without noise on private data; for the data owner's audit, 0.5 is chance"}
