"""DP-SGD checked against references: per-sample gradients vs a per-example loop, clipping bounds, noise std,
empty batches, and the reported ε vs an independent accountant."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from core.dp import DPGradient
from core.objective import classification_losses, completion_losses
from core.spec import TrainSpec
from core.train import train, trainable_module
from tests.core.helpers import batch_of, tiny_learner, tiny_rows


def _per_sample(learner, head, rows, task):  # noqa: ANN001, ANN202
    dp = DPGradient(trainable_module(learner, head), max_grad_norm=1e9, noise_multiplier=0.0, private=True)
    learner.train(True)
    batch = batch_of(learner, rows)
    losses = classification_losses(learner, head, batch)[0] if task == "classification" \
        else completion_losses(learner, batch)[0]
    losses.sum().backward()
    return [p.grad_sample.detach().clone() for p in dp.params], dp.params


def _loop(learner, head, rows, task, params):  # noqa: ANN001, ANN202
    out = []
    for r in rows:
        for p in params:
            p.grad = None
        batch = batch_of(learner, [r])
        loss = classification_losses(learner, head, batch)[0] if task == "classification" \
            else completion_losses(learner, batch)[0]
        g = torch.autograd.grad(loss.sum(), params)
        out.append([x.detach().clone() for x in g])
    return [torch.stack([o[i] for o in out]) for i in range(len(params))]


@pytest.mark.parametrize("name,task,tuning,head_kind", [
    ("tiny-bert", "classification", "prefix", None),      # encoder, verbalizer (embedding) head
    ("tiny-bert", "classification", "prefix", "mlm"),     # encoder, MLM label-word head
    ("tiny-bert", "classification", "prompt", "linear"),  # black-box soft prompt + learned head
    ("tiny-llama", "classification", "prefix", None),     # decoder, next-token label words
    ("tiny-llama", "generation", "prefix", None),         # decoder, completion loss
    ("tiny-llama", "generation", "prompt", None),
])
def test_per_sample_gradients_match_per_example_loop(name: str, task: str, tuning: str, head_kind: str) -> None:
    learner = tiny_learner(name, tuning=tuning)
    head, rows = tiny_rows(learner, 6, task=task, head_kind=head_kind)
    if head is not None and head_kind == "linear":
        torch.nn.init.normal_(head.linear.weight, std=0.1)  # zero init would give zero prefix gradients
    fast, params = _per_sample(learner, head, rows, task)
    slow = _loop(learner, head, rows, task, params)
    for a, b in zip(fast, slow):
        rel = (a - b).norm() / b.norm().clamp(min=1e-12)
        assert rel < 1e-4, f"per-sample gradient relative error {rel:.2e}"
        assert b.norm() > 0


def test_per_sample_gradients_exact_with_prefix_projection() -> None:
    """The reparametrised prefix (embedding → MLP) is exact too: Opacus' Linear sampler on [B, P, D] inputs."""
    from core.models import load_base_model
    from core.prompting import build_learner

    learner = build_learner(load_base_model("tiny-llama", cache_dir=None, seed=0),  # type: ignore[arg-type]
                            tuning="prefix", num_virtual_tokens=3, prefix_projection=True)
    head, rows = tiny_rows(learner, 5)
    fast, params = _per_sample(learner, head, rows, "classification")
    assert len(params) > 1  # embedding + MLP weights and biases
    slow = _loop(learner, head, rows, "classification", params)
    for a, b in zip(fast, slow):
        assert (a - b).norm() / b.norm().clamp(min=1e-12) < 1e-4


def test_clipping_bounds_every_example_and_noise_has_calibrated_std() -> None:
    learner = tiny_learner("tiny-bert")
    head, rows = tiny_rows(learner, 8)
    c = 1e-3  # far below the raw norms, so every example is clipped
    dp = DPGradient(trainable_module(learner, head), max_grad_norm=c, noise_multiplier=0.0, private=True)
    learner.train(True)
    norms = dp.accumulate(classification_losses(learner, head, batch_of(learner, rows))[0])
    assert (norms > c).all()
    total = torch.cat([a.flatten() for a in dp._sum]).norm()
    assert total <= len(rows) * c + 1e-6  # the sum of 8 clipped examples
    dp.finish(expected_batch_size=1.0)
    # Re-run example by example: each clipped contribution has norm <= C (+1e-6).
    for r in rows:
        dp.accumulate(classification_losses(learner, head, batch_of(learner, [r]))[0])
        single = torch.cat([a.flatten() for a in dp._sum]).norm()
        assert single <= c + 1e-6
        dp.finish(expected_batch_size=1.0)
    # Noise: with zero signal the gradient is pure N(0, (σC/B)^2).
    sigma, bsz = 2.0, 4.0
    gen = torch.Generator().manual_seed(0)
    noisy = DPGradient(trainable_module(learner, head), max_grad_norm=0.5, noise_multiplier=sigma, private=True,
                       generator=gen)
    noisy.finish(expected_batch_size=bsz)
    g = torch.cat([p.grad.flatten() for p in noisy.params])
    assert g.numel() > 500
    assert abs(float(g.std()) / (sigma * 0.5 / bsz) - 1) < 0.1
    assert abs(float(g.mean())) < 0.1 * sigma * 0.5 / bsz * 3


def _spec(**kw: object) -> TrainSpec:
    base = dict(model="tiny-bert", lr=0.05, batch_size=16, physical_batch_size=8, target_epsilon=8.0,
                max_grad_norm=1.0, seed=1, noise_seed=7)
    base.update(kw)
    return TrainSpec(**base)  # type: ignore[arg-type]


def test_empty_poisson_batch_takes_a_noise_only_step() -> None:
    learner = tiny_learner("tiny-bert")
    head, rows = tiny_rows(learner, 50)
    before = learner.prompt_encoder.embedding.weight.detach().clone()
    seen = []
    res = train(learner, head, rows, spec=_spec(), steps=3, sample_rate=1e-9, noise_multiplier=1.0, delta=1e-5,
                device=torch.device("cpu"), callback=lambda p: seen.append(p.metrics["examples"]))
    assert seen == [0, 0, 0]
    assert res.steps == 3 and len(res.accountant.events) == 1 and res.accountant.events[0].steps == 3
    assert not torch.equal(before, learner.prompt_encoder.embedding.weight)  # noise moved it


def test_dp_training_lowers_loss_and_is_repeatable() -> None:
    def run() -> tuple[list[float], torch.Tensor]:
        learner = tiny_learner("tiny-llama", seed=0)
        head, rows = tiny_rows(learner, 64)
        res = train(learner, head, rows, spec=_spec(model="tiny-llama", lr=0.5), steps=25, sample_rate=0.5,
                    noise_multiplier=0.3, delta=1e-5, device=torch.device("cpu"))
        return res.losses, learner.prompt_encoder.embedding.weight.detach().clone()

    losses, w = run()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, (first, last)
    losses2, w2 = run()
    assert losses == losses2 and torch.equal(w, w2)


def test_noise_is_unpredictable_unless_seeded() -> None:
    def weights(noise_seed: int | None) -> torch.Tensor:
        learner = tiny_learner("tiny-bert", seed=0)
        head, rows = tiny_rows(learner, 20)
        train(learner, head, rows, spec=_spec(noise_seed=noise_seed), steps=2, sample_rate=0.5,
              noise_multiplier=1.0, delta=1e-5, device=torch.device("cpu"))
        return learner.prompt_encoder.embedding.weight.detach().clone()

    assert not torch.equal(weights(None), weights(None))  # OS entropy: never the same noise twice
    assert torch.equal(weights(3), weights(3))


def test_reported_epsilon_matches_independent_accountant() -> None:
    learner = tiny_learner("tiny-bert")
    head, rows = tiny_rows(learner, 40)
    sigma, q, steps, delta = 1.1, 0.25, 6, 1e-5
    res = train(learner, head, rows, spec=_spec(), steps=steps, sample_rate=q, noise_multiplier=sigma, delta=delta,
                device=torch.device("cpu"))
    ours = res.accountant.epsilon(delta=delta)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    theirs, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                                 orders=orders), delta=delta)
    assert math.isclose(ours, theirs, rel_tol=0.01), (ours, theirs)


def test_non_private_mode_uses_plain_mean_gradient() -> None:
    learner = tiny_learner("tiny-bert")
    head, rows = tiny_rows(learner, 4)
    dp = DPGradient(trainable_module(learner, head), max_grad_norm=1e-6, noise_multiplier=5.0, private=False)
    learner.train(True)
    dp.accumulate(classification_losses(learner, head, batch_of(learner, rows))[0])
    dp.finish(expected_batch_size=100.0)
    got = [p.grad.clone() for p in dp.params]
    for p in dp.params:
        p.grad = None
    classification_losses(learner, head, batch_of(learner, rows))[0].mean().backward()
    for g, p in zip(got, dp.params):
        torch.testing.assert_close(g, p.grad)
