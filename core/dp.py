"""DP-SGD gradient step: per-sample gradients (Opacus hooks), flat clipping, Gaussian noise.

One logical (Poisson) batch is processed as several physical batches: each call to :meth:`accumulate` adds the
*clipped* per-example gradients of one physical batch to a running sum; :meth:`finish` adds noise
N(0, σ²C²) once and divides by the *expected* batch size qN (Opacus' convention, which keeps the noise scale
independent of the realised batch size). ``private=False`` runs the same loop with plain mean gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from torch import nn


@dataclass(frozen=True)
class StepStats:
    """What one logical step did: examples used, mean per-example grad norm before clipping, clipped share."""

    examples: int
    grad_norm: float
    clipped_fraction: float


class DPGradient:
    """Accumulates clipped per-example gradients of ``module``'s trainable parameters and privatises them.

    Args:
        module: the module holding every trainable parameter exactly once (wrapping it twice would make the
            hooks fire twice and double the per-sample gradients).
        max_grad_norm: clipping bound C.
        noise_multiplier: σ; the noise std is σ·C.
        private: False = no per-sample gradients, no clipping, no noise (non-private baseline / teacher).
        generator: the noise RNG (seeded per job).
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, noise_multiplier: float, private: bool,
                 generator: torch.Generator | None = None) -> None:
        self.private = private
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.generator = generator
        self.module = GradSampleModule(module, batch_first=True, loss_reduction="sum") if private else module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._sum = [torch.zeros_like(p) for p in self.params]
        self._count = 0
        self._norm_sum = 0.0
        self._clipped = 0

    def accumulate(self, losses: torch.Tensor) -> torch.Tensor:
        """Backpropagate a physical batch's per-example losses [b] and add their (clipped) gradients.

        Returns the per-example gradient norms before clipping [b] (private mode), else an empty tensor.
        """
        for p in self.params:
            p.grad = None
        losses.sum().backward()
        self._count += int(losses.shape[0])
        if not self.private:
            for acc, p in zip(self._sum, self.params):
                if p.grad is not None:
                    acc.add_(p.grad)
            return torch.empty(0)
        grads: list[torch.Tensor] = [getattr(p, "grad_sample") for p in self.params]  # noqa: B009 - [b, *p.shape]
        norms = torch.stack([g.reshape(g.shape[0], -1).norm(2, dim=1) for g in grads], dim=1).norm(2, dim=1)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # [b]
        for acc, g in zip(self._sum, grads):
            acc.add_(torch.einsum("b,b...->...", factor.to(g.dtype), g))
        for p in self.params:
            setattr(p, "grad_sample", None)  # noqa: B010
            p.grad = None
        self._norm_sum += float(norms.sum())
        self._clipped += int((norms > self.max_grad_norm).sum())
        return norms.detach()

    def raw_gradient(self, losses: torch.Tensor) -> list[torch.Tensor]:
        """The plain mean gradient of ``losses`` [b]: no clipping, no noise. Empirical-mode AWP only (the
        paper's recipe); it is an un-privatised use of the data, which is why formal mode never calls it."""
        for p in self.params:
            p.grad = None
        losses.sum().backward()
        b = max(int(losses.shape[0]), 1)
        out = [p.grad.detach() / b if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            setattr(p, "grad_sample", None)  # noqa: B010
            p.grad = None
        return out

    def close(self) -> None:
        """Remove the per-sample hooks, so later forward/backward passes (evaluation, flatness) are plain."""
        if isinstance(self.module, GradSampleModule):
            self.module._close()

    def finish(self, *, expected_batch_size: float) -> StepStats:
        """Write the privatised mean gradient into ``p.grad`` for the optimizer and reset the accumulator."""
        for acc, p in zip(self._sum, self.params):
            if self.private:
                std = self.noise_multiplier * self.max_grad_norm
                noise = torch.normal(0.0, std, size=acc.shape, generator=self.generator, device=acc.device) \
                    if std > 0 else torch.zeros_like(acc)
                p.grad = (acc + noise.to(acc.dtype)) / expected_batch_size
            else:
                p.grad = acc / max(self._count, 1)
        count = self._count
        stats = StepStats(count, self._norm_sum / count if count else 0.0, self._clipped / count if count else 0.0)
        self._sum = [torch.zeros_like(p) for p in self.params]
        self._count, self._norm_sum, self._clipped = 0, 0.0, 0
        return stats
