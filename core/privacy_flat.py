"""Privacy-Flat's stages before DP training (Chen et al., arXiv 2403.04124): the non-private teacher
(cross-model) and the choice of prefix layers (cross-layer). AWP (within-layer) lives in the training loop.

Which data each stage may touch is the whole difference between the two guarantees:

- ``formal``: the teacher trains on the public file and the layer probe runs on it too; nothing derived
  from the private set enters training except through the DP mechanism.
- ``empirical``: the paper's recipe. The teacher trains on the private set; the layer probe uses the
  validation split (or, without one, the first private rows). No formal bound holds afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from core.batching import Encoded
from core.distill import restore, snapshot, train_teacher
from core.heads import Head
from core.layers import select_layers
from core.objective import Distill, probe_loss
from core.prompting import PromptLearner
from core.spec import TrainSpec, check_public_data


@dataclass
class FlatSetup:
    """What the training loop needs (the distillation term) and what the report records."""

    distill: Distill | None = None
    report: dict[str, Any] = field(default_factory=dict)


def default_keep(num_layers: int) -> int:
    """The paper keeps 9 of 12 layers: ceil(3/4 of them)."""
    return max(1, math.ceil(0.75 * num_layers))


def setup(learner: PromptLearner, head: Head | None, spec: TrainSpec, *, private_rows: Sequence[Encoded],
          public_rows: Sequence[Encoded] | None, validation_rows: Sequence[Encoded] | None,
          device: torch.device) -> FlatSetup:
    """Train the teacher and select the layers, as ``spec`` asks; the prefix is left at its initial value
    (never trained on anything) with the selected layers set, ready for DP training.

    Raises:
        InvalidSpec: formal mode needs public data for the teacher or the layer probe (``public_data``).
    """
    if spec.method != "privacy_flat":
        return FlatSetup()
    check_public_data(spec, has_public=bool(public_rows))
    formal = spec.guarantee == "formal"
    teacher_rows: Sequence[Encoded] = list(public_rows or []) if formal else private_rows
    probe_rows: Sequence[Encoded] = []
    if spec.uses_layer_selection:
        if formal:  # hold the probe out of the teacher's public data when there is enough of it
            pub = list(public_rows or [])
            k = min(spec.selection_probe, len(pub) // 2) if len(pub) >= 2 * spec.selection_probe else len(pub)
            probe_rows = pub[-k:] if k < len(pub) else pub
            teacher_rows = pub[:-k] if k < len(pub) else pub
        else:
            probe_rows = list(validation_rows or private_rows)[: spec.selection_probe]
    parts: dict[str, Any] = {"guarantee": spec.guarantee, "tuning": spec.tuning,
                             "awp": spec.uses_awp, "layer_selection": spec.uses_layer_selection,
                             "distillation": spec.uses_distillation}
    if spec.layer_selection and not spec.uses_layer_selection:
        parts["layer_selection_note"] = "not applicable: a soft prompt has no per-layer prefix"
    initial = snapshot(learner)
    teacher = None
    if spec.uses_distillation:
        teacher = train_teacher(learner, head, teacher_rows, spec=spec, device=device,
                                source="public" if formal else "private")
        parts["teacher"] = teacher.describe()
    if spec.uses_layer_selection:
        keep = spec.keep_layers or default_keep(learner.num_layers)
        learner.train(False)
        sel = select_layers(learner, probe_loss(learner, head, probe_rows, device=device), keep=keep,
                            rho=spec.flatness_rho, directions=spec.selection_directions, seed=spec.seed,
                            removal=spec.layer_removal)
        sel["probe"] = {"source": "public" if formal else ("validation" if validation_rows else "private"),
                        "rows": len(probe_rows), "at": "teacher prefix" if teacher else "initial prefix"}
        parts["selection"] = sel
    restore(learner, initial)
    distill = None
    if teacher is not None:
        distill = Distill(teacher.states, learner.layer_columns(), spec.distill_lambda, spec.distill_logits)
        parts["distill"] = {"lambda": spec.distill_lambda, "logit_weight": spec.distill_logits,
                            "initial_distance": float(_distance(learner, distill))}
    return FlatSetup(distill, parts)


@torch.no_grad()
def _distance(learner: PromptLearner, distill: Distill) -> torch.Tensor:
    diff = learner.prompt_states(1)[0].float() - distill.teacher.float()
    if distill.columns is not None:
        diff = diff * distill.columns.to(diff.device)
    return diff.norm()
