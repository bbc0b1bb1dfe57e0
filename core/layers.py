"""Cross-layer flatness: choose which prefix layers to keep (Privacy-Flat §3.2, sparse prefix-tuning).

The paper zeroes the prefix of 3 of 12 layers from hand-made per-task lists. Here the choice is automatic:
for each layer j the indicator is how much *sharper* the loss gets when j's prefix is removed,

    I_j = S(prefix without layer j) − S(full prefix),   S = E_d[L(w + d)] − L(w),

with d random directions of relative radius ρ per layer block (the same directions for every j, so the
comparison is paired). Layers whose presence flattens the loss most (largest I_j) are kept. The probe loss
is computed on data the caller vouches for: public data in formal mode, a validation split in empirical
mode (see :func:`core.pipeline.select`). Same seed, same directions, same choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from core.prompting import PromptLearner

LossFn = Callable[[], torch.Tensor]


@torch.no_grad()
def select_layers(learner: PromptLearner, loss_fn: LossFn, *, keep: int, rho: float, directions: int,
                  seed: int, removal: str = "mask") -> dict[str, Any]:
    """Score every prefix layer and keep the ``keep`` best; leaves ``learner`` with those layers set.

    Args:
        loss_fn: mean task loss on the probe set at the current weights.
        keep: layers to keep (clamped to [1, num_layers]).
        rho: relative radius per layer block; directions: random directions per configuration.
    Returns:
        ``{"indicator", "sharpness_full", "sharpness_without", "loss_full", "loss_without", "kept",
        "removed", "rho", "directions"}``; lists are indexed by layer.
    """
    blocks = learner.blocks()
    params = learner.trainable_parameters()
    saved = [p.detach().clone() for p in params]
    index = {id(p): i for i, p in enumerate(params)}
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(directions):
        step = [torch.zeros_like(p) for p in params]
        for b in blocks:
            i = index[id(b.param)]
            d = torch.randn(b.view(saved[i]).shape, generator=gen).to(saved[i])
            b.view(step[i]).copy_(d * (rho * b.view(saved[i]).norm() / d.norm().clamp(min=1e-12)))
        steps.append(step)

    def sharpness() -> tuple[float, float]:
        base = float(loss_fn())
        rises = []
        for step in steps:
            for p, w, s in zip(params, saved, step):
                p.copy_(w + s)
            rises.append(float(loss_fn()) - base)
        for p, w in zip(params, saved):
            p.copy_(w)
        return sum(rises) / len(rises), base

    n = learner.num_layers
    try:
        learner.set_layers(None)
        full, loss_full = sharpness()
        without, loss_without = [], []
        for j in range(n):
            learner.set_layers([k for k in range(n) if k != j], removal=removal)
            s, loss = sharpness()
            without.append(s)
            loss_without.append(loss)
    finally:
        for p, w in zip(params, saved):
            p.copy_(w)
    indicator = [s - full for s in without]
    order = sorted(range(n), key=lambda j: (-indicator[j], j))  # ties: the lower layer, deterministically
    kept = sorted(order[: max(1, min(keep, n))])
    learner.set_layers(kept, removal=removal)
    return {"indicator": indicator, "sharpness_full": full, "sharpness_without": without, "loss_full": loss_full,
            "loss_without": loss_without, "kept": kept, "removed": [j for j in range(n) if j not in kept],
            "rho": rho, "directions": directions, "removal": removal}
