"""The DP-SGD training loop, top to bottom.

Each step: Poisson-sample a logical batch (rate q) → split it into length-sorted physical batches → per-example
losses → clipped per-example gradients summed → one Gaussian noise draw → optimizer step → accountant step →
progress callback (which may cancel). An empty logical batch still takes a noise-only step: skipping it would
change the mechanism the accountant analyses.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from core.accounting import PrivacyAccountant
from core.awp import AdversarialPerturbation
from core.batching import Batch, Encoded, collate, length_chunks, poisson_sample
from core.dp import DPGradient
from core.errors import Cancelled
from core.heads import Head
from core.objective import Distill, autocast_for, example_losses
from core.prompting import PromptLearner
from core.spec import TrainSpec


@dataclass(frozen=True)
class Progress:
    """One progress report leaving the core. ``epsilon`` is the ε spent so far (None when non-private)."""

    stage: str
    step: int
    total_steps: int
    loss: float | None = None
    epsilon: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


# Return False to cancel: the loop stops after the step it just finished (that step stays spent).
ProgressFn = Callable[[Progress], bool | None]


@dataclass
class TrainResult:
    steps: int
    noise_multiplier: float
    sample_rate: float
    accountant: PrivacyAccountant
    losses: list[float]
    seconds: float
    examples_seen: int
    awp: dict[str, Any] | None = None


def make_optimizer(params: Sequence[nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def trainable_module(learner: PromptLearner, head: Head | None) -> nn.Module:
    """Every trainable parameter, each exactly once (see :class:`core.dp.DPGradient`)."""
    parts = nn.ModuleDict({"prompt": learner.prompt_encoder})
    if head is not None and any(p.requires_grad for p in head.parameters()):
        parts["head"] = head
    return parts


def private_randomness(spec: TrainSpec, device: torch.device) -> tuple[np.random.Generator, torch.Generator, int]:
    """The Poisson-sampling RNG, the noise generator and their seed.

    The guarantee assumes the adversary cannot predict the sampling or the noise: the seed comes from the OS
    unless the spec asks for repeatable runs (the report then says the noise was seeded).
    """
    seed = spec.noise_seed if spec.noise_seed is not None else secrets.randbits(62)
    return np.random.default_rng(seed), torch.Generator(device=device).manual_seed(seed + 1), seed


def awp_plan(learner: PromptLearner, spec: TrainSpec, *, steps: int,
             params: Sequence[nn.Parameter]) -> tuple[AdversarialPerturbation | None, int]:
    """The AWP helper over the kept layers' blocks and the last step that uses it (0: no AWP). ``params`` is
    the order the ascent directions come in (the prompt's tensors among them)."""
    if not spec.uses_awp:
        return None, 0
    kept = learner.kept_layers
    blocks = [b for b in learner.blocks() if kept is None or b.layer is None or b.layer in kept]
    return AdversarialPerturbation(params, blocks, gamma=spec.awp_gamma), \
        math.ceil(spec.awp_fraction * steps)


def freeze_removed_columns(learner: PromptLearner) -> None:
    """Zero the update of removed layers' prefix columns (post-processing of the privatised gradient): they
    never reach the model, so they keep their initial no-op value instead of drifting with the noise."""
    cols = learner.layer_columns()
    weight = learner.prompt_encoder.embedding.weight
    if cols is not None and weight.grad is not None:
        weight.grad.mul_(cols.to(weight.grad))


def train(learner: PromptLearner, head: Head | None, rows: Sequence[Encoded], *, spec: TrainSpec, steps: int,
          sample_rate: float, noise_multiplier: float, delta: float, device: torch.device,
          callback: ProgressFn | None = None, accountant: PrivacyAccountant | None = None,
          distill: Distill | None = None) -> TrainResult:
    """Run ``steps`` DP-SGD steps (or non-private steps when ``spec.private`` is False).

    Privacy-Flat (``spec.method == "privacy_flat"``) adds, inside the same step: AWP during the first
    ``awp_fraction`` of the steps (ascent along the previous privatised gradient in formal mode, along one
    micro-batch's raw gradient in empirical mode) and the ``distill`` term inside every per-example loss.

    Args:
        rows: encoded training examples (N of them).
        steps, sample_rate, noise_multiplier: the calibrated mechanism (T, q, σ).
        delta: δ used to report ε spent so far.
        accountant: continue an existing accountant (a resumed job); a fresh one by default.
        distill: the teacher term (see :class:`core.objective.Distill`); clipped with each example.
    Raises:
        Cancelled: the callback returned False; ``err.result`` holds the partial :class:`TrainResult`.
    """
    n = len(rows)
    lengths = [len(r) for r in rows]
    pad = learner.base.tokenizer.pad_token_id
    rng, gen, _ = private_randomness(spec, device)
    module = trainable_module(learner, head)
    dp = DPGradient(module, max_grad_norm=spec.max_grad_norm, noise_multiplier=noise_multiplier,
                    private=spec.private, generator=gen)
    optim = make_optimizer(dp.params, spec)
    acct = accountant or PrivacyAccountant(accountant=spec.accountant)
    expected = sample_rate * n
    awp, awp_until = awp_plan(learner, spec, steps=steps, params=dp.params)
    awp_norms: list[float] = []
    previous: list[torch.Tensor] | None = None  # the last privatised gradient: public, AWP may use it
    learner.train(True)
    losses: list[float] = []
    seen, start = 0, time.perf_counter()

    def losses_of(batch: Batch) -> torch.Tensor:
        with autocast_for(device):
            return example_losses(learner, head, batch, distill).float()

    try:
        for step in range(1, steps + 1):
            batch_idx = poisson_sample(n, sample_rate=sample_rate, rng=rng)
            chunks = [collate([rows[i] for i in c], pad_id=pad).to(device)
                      for c in length_chunks(batch_idx, lengths, max_rows=spec.physical_batch_size)]
            if awp is not None and step <= awp_until:
                if spec.guarantee == "formal":
                    if previous is not None:  # step 1 has no privatised gradient yet: no perturbation
                        awp_norms += awp.ascend(previous)
                elif chunks:  # empirical: the paper's raw, un-clipped, un-noised micro-batch gradient
                    for _ in range(spec.awp_steps):
                        awp_norms += awp.ascend(dp.raw_gradient(losses_of(chunks[0])))
            step_loss = 0.0
            for batch in chunks:
                per_example = losses_of(batch)
                dp.accumulate(per_example)
                step_loss += float(per_example.detach().sum())
            stats = dp.finish(expected_batch_size=expected)
            if awp is not None:
                awp.restore()  # the gradient taken at w + v is applied at w
                previous = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                            for p in dp.params]
            freeze_removed_columns(learner)
            optim.step()
            optim.zero_grad(set_to_none=True)
            if spec.private:
                acct.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
            seen += stats.examples
            losses.append(step_loss / stats.examples if stats.examples else float("nan"))
            if callback is not None:
                eps = acct.epsilon(delta=delta) if spec.private else None
                report = Progress("train", step, steps, loss=losses[-1], epsilon=eps,
                                  metrics={"examples": stats.examples, "grad_norm": stats.grad_norm,
                                           "clipped_fraction": stats.clipped_fraction})
                if callback(report) is False:
                    learner.train(False)
                    err = Cancelled(f"cancelled after step {step} of {steps}")
                    err.result = TrainResult(step, noise_multiplier, sample_rate, acct, losses,  # type: ignore[attr-defined]
                                             time.perf_counter() - start, seen, awp_summary(spec, awp_until,
                                                                                             awp_norms))
                    raise err
    finally:
        if awp is not None:
            awp.restore()
        dp.close()
    learner.train(False)
    return TrainResult(steps, noise_multiplier, sample_rate, acct, losses, time.perf_counter() - start, seen,
                       awp_summary(spec, awp_until, awp_norms))


def awp_summary(spec: TrainSpec, until: int, norms: list[float]) -> dict[str, Any] | None:
    if not spec.uses_awp:
        return None
    return {"gamma": spec.awp_gamma, "fraction": spec.awp_fraction, "steps_with_awp": until,
            "ascent_steps": spec.awp_steps if spec.guarantee == "empirical" else 1,
            "direction": "previous privatised gradient (post-processing)" if spec.guarantee == "formal"
            else "raw micro-batch gradient (un-noised private data)",
            "mean_block_norm": sum(norms) / len(norms) if norms else 0.0}
