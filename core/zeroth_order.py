"""Forward-only black-box training: DP zeroth-order optimisation of the soft prompt (DP-ZO, Tang et al. 2024).

Each step draws one direction z ~ N(0, I) over the prompt (independent of the data) and asks the model only
for losses: per example i, the finite difference g_i = (L_i(w + μz) − L_i(w − μz)) / 2μ, a scalar. Each g_i
is clipped to [−C, C], so one example changes the sum by at most C, and Gaussian noise N(0, σ²C²) is added
once: the same subsampled Gaussian mechanism as DP-SGD, accounted by the same accountant. The update is
(Σ clip(g_i) + noise)/(qN) · z. No backward pass ever runs through the model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from core.accounting import PrivacyAccountant
from core.batching import Encoded, collate, length_chunks, poisson_sample
from core.errors import Cancelled
from core.heads import Head
from core.objective import Distill, autocast_for, example_losses
from core.prompting import PromptLearner
from core.spec import TrainSpec
from core.train import (
    Progress,
    ProgressFn,
    TrainResult,
    awp_plan,
    awp_summary,
    freeze_removed_columns,
    make_optimizer,
    private_randomness,
    trainable_module,
)


@torch.no_grad()
def train_zeroth_order(learner: PromptLearner, head: Head | None, rows: Sequence[Encoded], *, spec: TrainSpec,
                       steps: int, sample_rate: float, noise_multiplier: float, delta: float, device: torch.device,
                       callback: ProgressFn | None = None, accountant: PrivacyAccountant | None = None,
                       distill: Distill | None = None) -> TrainResult:
    """Same contract as :func:`core.train.train`, forward passes only (runs entirely under ``no_grad``).

    AWP applies as in DP-SGD: formal mode ascends along the previous privatised update, empirical mode along
    one micro-batch's un-clipped, un-noised estimate.
    """
    n = len(rows)
    lengths = [len(r) for r in rows]
    pad = learner.base.tokenizer.pad_token_id
    rng, gen, noise_seed = private_randomness(spec, device)
    zgen = torch.Generator(device=device).manual_seed(noise_seed + 2)  # z is data-independent
    params = [p for p in trainable_module(learner, head).parameters() if p.requires_grad]
    optim = make_optimizer(params, spec)
    acct = accountant or PrivacyAccountant(accountant=spec.accountant)
    c, mu = spec.max_grad_norm, spec.zo_mu
    awp, awp_until = awp_plan(learner, spec, steps=steps, params=params)
    awp_norms: list[float] = []
    previous: list[torch.Tensor] | None = None
    losses: list[float] = []
    seen, start = 0, time.perf_counter()

    def differences(chunk_rows: list[Encoded], z: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example finite differences [b] and the losses at w [b]: three forward passes."""
        batch = collate(chunk_rows, pad_id=pad).to(device)
        out = []
        for sign in (1.0, -1.0, 0.0):
            for p, d in zip(params, z):
                p.add_(d, alpha=sign * mu)
            with autocast_for(device):
                out.append(example_losses(learner, head, batch, distill).float())
            for p, d in zip(params, z):
                p.sub_(d, alpha=sign * mu)
        return (out[0] - out[1]) / (2 * mu), out[2]

    for step in range(1, steps + 1):
        batch_idx = poisson_sample(n, sample_rate=sample_rate, rng=rng)
        chunks = [[rows[i] for i in ch] for ch in length_chunks(batch_idx, lengths, max_rows=spec.physical_batch_size)]
        z = [torch.randn(p.shape, generator=zgen, device=device).to(p.dtype) for p in params]
        if awp is not None and step <= awp_until:
            if spec.guarantee == "formal" and previous is not None:
                awp_norms += awp.ascend(previous)
            elif spec.guarantee == "empirical" and chunks:
                raw = differences(chunks[0], z)[0].mean()
                awp_norms += awp.ascend([raw * d for d in z])
        total, count, clipped, step_loss = torch.zeros((), device=device), 0, 0, 0.0
        for chunk in chunks:
            g, at_w = differences(chunk, z)
            if spec.private:
                clipped += int((g.abs() > c).sum())
                g = g.clamp(-c, c)  # |g_i| <= C: sensitivity C per example
            total += g.sum()
            count += len(chunk)
            step_loss += float(at_w.sum())
        if spec.private:
            noise = torch.normal(0.0, noise_multiplier * c, size=(), generator=gen, device=device)
            estimate = (total + noise) / (sample_rate * n)
        else:
            estimate = total / max(count, 1)
        if awp is not None:
            awp.restore()
        for p, d in zip(params, z):
            p.grad = (estimate * d).to(p.dtype)
        if awp is not None:
            previous = [(estimate * d).to(p.dtype) for p, d in zip(params, z)]
        freeze_removed_columns(learner)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if spec.private:
            acct.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        seen += count
        losses.append(step_loss / count if count else float("nan"))
        if callback is not None:
            eps = acct.epsilon(delta=delta) if spec.private else None
            report = Progress("train", step, steps, loss=losses[-1], epsilon=eps,
                              metrics={"examples": count, "projected_gradient": float(estimate),
                                       "clipped_fraction": clipped / count if count else 0.0})
            if callback(report) is False:
                if awp is not None:
                    awp.restore()
                err = Cancelled(f"cancelled after step {step} of {steps}")
                err.result = TrainResult(step, noise_multiplier, sample_rate, acct, losses,  # type: ignore[attr-defined]
                                         time.perf_counter() - start, seen, awp_summary(spec, awp_until, awp_norms))
                raise err
    return TrainResult(steps, noise_multiplier, sample_rate, acct, losses, time.perf_counter() - start, seen,
                       awp_summary(spec, awp_until, awp_norms))
