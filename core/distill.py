"""Cross-model flatness: the non-private teacher prefix that guides DP training (Privacy-Flat §3.3).

The teacher is the same prefix trained without clipping or noise. Whose data it sees decides the privacy:
in ``formal`` mode only data the user declared public (a separate file); in ``empirical`` mode the private
training set, as the paper does (its weights then carry un-noised private information into the DP run).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core import accounting
from core.batching import Encoded
from core.heads import Head
from core.prompting import PromptLearner
from core.spec import TrainSpec
from core.train import train


@dataclass
class Teacher:
    """The teacher's prompt states [P, F] and how they were made (for the report)."""

    states: torch.Tensor
    source: str
    rows: int
    steps: int
    final_loss: float | None
    seconds: float

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "steps": self.steps, "final_loss": self.final_loss,
                "seconds": round(self.seconds, 2)}


def snapshot(learner: PromptLearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.prompt_encoder.state_dict().items()}


def restore(learner: PromptLearner, saved: dict[str, torch.Tensor]) -> None:
    learner.prompt_encoder.load_state_dict(saved)


def train_teacher(learner: PromptLearner, head: Head | None, rows: Sequence[Encoded], *, spec: TrainSpec,
                  source: str, device: torch.device) -> Teacher:
    """Train ``learner``'s prefix non-privately on ``rows`` (left in place: the caller snapshots and restores).

    Args:
        rows: the teacher's data: public rows in formal mode, the private rows in empirical mode.
        source: what ``rows`` are, for the report (``public`` / ``private``).
    """
    start = time.perf_counter()
    n = len(rows)
    teacher_spec = dataclasses.replace(spec, method="non_private", guarantee="none", target_epsilon=None,
                                       batch_size=min(spec.teacher_batch_size, n), epochs=spec.teacher_epochs,
                                       max_steps=None)
    q = accounting.sample_rate_for(batch_size=teacher_spec.batch_size, dataset_size=n)
    steps = accounting.steps_for(epochs=teacher_spec.epochs, sample_rate=q)
    result = train(learner, head, rows, spec=teacher_spec, steps=steps, sample_rate=q, noise_multiplier=0.0,
                   delta=1.0 / (10 * n), device=device)
    with torch.no_grad():
        states = learner.prompt_states(1)[0].detach().clone()
    tail = [x for x in result.losses[-10:] if x == x]
    return Teacher(states, source, n, steps, sum(tail) / len(tail) if tail else None, time.perf_counter() - start)
