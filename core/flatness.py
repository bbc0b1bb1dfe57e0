"""Flatness of the loss landscape around the trained prefix (Privacy-Flat, Chen et al. 2024, Figs. 1 and 3).

Two figures, both relative to the weights' own scale so they compare across runs and models:

- **sharpness**: L(w + d) − L(w) for perturbations d with ‖d_t‖ = ρ·‖w_t‖ for every trainable tensor t,
  averaged over random Gaussian directions, and along the (normalised) gradient direction;
- **1-D landscape**: L(w + α·d) for α in [−1, 1], for a random and the gradient direction (same scaling).

Measured on the evaluation set, like the metrics (never on the private training set: the report would
release an un-noised statistic of it). The weights are restored bit for bit afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

LossFn = Callable[[], torch.Tensor]  # mean loss over the probe set, differentiable w.r.t. the parameters


@contextmanager
def _restored(params: Sequence[nn.Parameter]):  # noqa: ANN202
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _scaled(direction: Sequence[torch.Tensor], params: Sequence[nn.Parameter], rho: float) -> list[torch.Tensor]:
    """Rescale each tensor of ``direction`` to norm ρ·‖w_t‖ (filter-normalised, per tensor)."""
    return [d * (rho * p.detach().norm() / d.norm().clamp(min=1e-12)) for d, p in zip(direction, params)]


def _loss_at(loss_fn: LossFn, params: Sequence[nn.Parameter], base: Sequence[torch.Tensor],
             step: Sequence[torch.Tensor], alpha: float) -> float:
    with torch.no_grad():
        for p, w, d in zip(params, base, step):
            p.copy_(w + alpha * d)
        return float(loss_fn())


def measure(loss_fn: LossFn, params: Sequence[nn.Parameter], *, rho: float = 0.05, random_directions: int = 4,
            alphas: Sequence[float] = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0), seed: int = 0) -> dict[str, Any]:
    """Sharpness (random and gradient directions) and 1-D landscape curves around the current weights.

    Args:
        loss_fn: evaluates the mean probe loss at the current parameter values.
        params: the trainable tensors (the prefix); everything else stays fixed.
        rho: relative radius; each tensor moves by ρ·‖w_t‖.
    Returns:
        ``{"rho", "loss", "sharpness_random", "sharpness_random_std", "sharpness_gradient", "curves"}``;
        ``curves[name]`` is a list of ``[alpha, loss]`` pairs.
    """
    gen = torch.Generator().manual_seed(seed)
    with _restored(params):
        base = [p.detach().clone() for p in params]
        for p in params:
            p.grad = None
        loss_t = loss_fn()
        grads = torch.autograd.grad(loss_t, list(params), allow_unused=True)
        loss0 = float(loss_t.detach())
        grads = tuple(g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params))
        gdir = _scaled([g.detach() for g in grads], params, rho)
        rand = [_scaled([torch.randn(p.shape, generator=gen).to(p) for p in params], params, rho)
                for _ in range(random_directions)]
        rises = torch.tensor([_loss_at(loss_fn, params, base, d, 1.0) - loss0 for d in rand])
        grad_rise = _loss_at(loss_fn, params, base, gdir, 1.0) - loss0
        curves = {name: [[a, _loss_at(loss_fn, params, base, d, a)] for a in alphas]
                  for name, d in (("random", rand[0]), ("gradient", gdir))}
    return {"rho": rho, "loss": loss0, "sharpness_random": float(rises.mean()),
            "sharpness_random_std": float(rises.std()) if len(rises) > 1 else 0.0,
            "sharpness_gradient": grad_rise, "curves": curves}


def plot(flatness: dict[str, Any], path: Path) -> Path:
    """The 1-D landscape curves as a PNG (the paper's Figures 1 and 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for name, points in flatness["curves"].items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=f"{name} direction")
    ax.set_xlabel(f"α (step = α·{flatness['rho']}·‖w‖ per tensor)")
    ax.set_ylabel("evaluation loss")
    ax.set_title(f"loss landscape; sharpness {flatness['sharpness_random']:.4f} (random), "
                 f"{flatness['sharpness_gradient']:.4f} (gradient)", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
