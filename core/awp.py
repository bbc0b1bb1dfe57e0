"""Within-layer flatness: adversarial weight perturbation (AWP) of the prefix (Privacy-Flat §3.1, after Wu et
al. 2020). Before a step's gradient is computed the prefix moves to w + v, uphill; the gradient taken there
is applied at w (the weights are restored bit for bit before the optimizer step), which favours flat minima.

The radius is relative **per prefix layer** (each transformer layer's key/value block): ‖v_l‖ = γ·‖w_l‖, as
AWP intends; the paper's code had one radius for the whole prefix tensor. Where the ascent direction comes
from decides the privacy (see :func:`core.train.train`): in ``formal`` mode it is the previous step's
*privatised* gradient (post-processing, as DP-SAT does; no privacy cost), in ``empirical`` mode the raw
gradient of one micro-batch (the paper's recipe: an un-noised use of private data, no formal bound).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.prompting import Block


class AdversarialPerturbation:
    """Perturb ``blocks`` of ``params`` along a direction, then restore them exactly.

    Args:
        params: the trainable tensors, in the order directions are given.
        blocks: the units that each get radius γ·‖w_block‖ (blocks of removed layers should be left out).
        gamma: relative radius γ.
    """

    def __init__(self, params: Sequence[nn.Parameter], blocks: Sequence[Block], *, gamma: float) -> None:
        self.params = list(params)
        self.blocks = list(blocks)
        self.gamma = gamma
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._saved: list[torch.Tensor] | None = None
        self._v: list[torch.Tensor] = []

    @property
    def active(self) -> bool:
        return self._saved is not None

    @torch.no_grad()
    def ascend(self, direction: Sequence[torch.Tensor]) -> list[float]:
        """Move uphill along ``direction`` (aligned with ``params``); repeated calls take further ascent steps,
        each projected back onto the sphere of radius γ·‖w_block‖ around the original weights.

        Returns the perturbation norm per block (0 where the direction is zero on that block).
        """
        if self._saved is None:
            self._saved = [p.detach().clone() for p in self.params]
            self._v = [torch.zeros_like(p) for p in self.params]
        norms = []
        for block in self.blocks:
            i = self._index[id(block.param)]
            w0 = block.view(self._saved[i])
            radius = self.gamma * float(w0.norm())
            d = block.view(direction[i]).to(w0.dtype)
            v = block.view(self._v[i])
            step = d * (radius / float(d.norm())) if float(d.norm()) > 0 else torch.zeros_like(d)
            v.add_(step)
            if float(v.norm()) > 0:
                v.mul_(radius / float(v.norm()))
            norms.append(float(v.norm()))
        for p, s, v in zip(self.params, self._saved, self._v):
            p.copy_(s + v)
        return norms

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back, bit for bit (a no-op when nothing is perturbed)."""
        if self._saved is None:
            return
        for p, s in zip(self.params, self._saved):
            p.copy_(s)
        self._saved, self._v = None, []
