"""Privacy-Flat's parts against references: AWP radius and exact restore, true layer removal, the
distillation term inside the clipped per-example gradient, formal mode using only privatised signals,
deterministic layer selection, and forward-only zeroth-order training."""

from __future__ import annotations

import pytest
import torch

import core.privacy_flat as privacy_flat
from core.awp import AdversarialPerturbation
from core.batching import encode_classification
from core.data import Example
from core.dp import DPGradient
from core.errors import InvalidSpec
from core.layers import select_layers
from core.objective import Distill, example_losses, probe_loss
from core.spec import TrainSpec
from core.train import train, trainable_module
from core.zeroth_order import train_zeroth_order
from tests.core.helpers import batch_of, tiny_learner, tiny_rows, toy_examples

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_masked_layers_lose_their_prefix_exactly(name: str) -> None:
    learner = tiny_learner(name)
    _, rows = tiny_rows(learner, 4, task="generation")
    b = batch_of(learner, rows)
    with torch.no_grad():
        bare = learner.hidden(b.input_ids, b.attention_mask, use_prompt=False).states
        full = learner.hidden(b.input_ids, b.attention_mask).states
        learner.set_layers([])  # every layer's prefix masked out: the bare model, to float precision
        none = learner.hidden(b.input_ids, b.attention_mask).states
        learner.set_layers(list(range(learner.num_layers)))
        every = learner.hidden(b.input_ids, b.attention_mask).states
        learner.set_layers([0], removal="zero")
        zeroed = learner.hidden(b.input_ids, b.attention_mask).states
    m = b.attention_mask.bool()
    assert (none - bare)[m].abs().max() < 1e-4 < (full - bare)[m].abs().max()
    assert torch.equal(every, full)
    assert (zeroed - full)[m].abs().max() > 1e-4 and (zeroed - bare)[m].abs().max() > 1e-4  # zero keys still count


def test_awp_radius_per_layer_and_exact_restore() -> None:
    learner = tiny_learner("tiny-bert")
    params = learner.trainable_parameters()
    before = [p.detach().clone() for p in params]
    awp = AdversarialPerturbation(params, learner.blocks(), gamma=0.03)
    direction = [torch.randn_like(p) for p in params]
    norms = awp.ascend(direction)
    assert len(norms) == learner.num_layers
    for block, norm in zip(learner.blocks(), norms):
        i = params.index(block.param)
        moved = block.view(params[i].detach()) - block.view(before[i])
        target = 0.03 * float(block.view(before[i]).norm())
        assert abs(float(moved.norm()) - target) / target < 1e-4 and abs(norm - target) / target < 1e-4
        # uphill: the perturbation points along the direction within each block
        assert float((moved * block.view(direction[i])).sum()) > 0
    awp.ascend(direction)  # a second ascent step stays on the sphere
    for block in learner.blocks():
        i = params.index(block.param)
        moved = block.view(params[i].detach()) - block.view(before[i])
        assert abs(float(moved.norm()) / (0.03 * float(block.view(before[i]).norm())) - 1) < 1e-4
    awp.restore()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_distillation_term_is_inside_the_clipped_per_example_gradient() -> None:
    torch.manual_seed(0)
    learner = tiny_learner("tiny-bert")
    head, rows = tiny_rows(learner, 6)
    teacher = learner.prompt_states(1)[0].detach() + 0.5 * torch.randn_like(learner.prompt_states(1)[0])
    distill = Distill(teacher, None, lam=0.7)
    clip = 0.05
    dp = DPGradient(trainable_module(learner, head), max_grad_norm=clip, noise_multiplier=0.0, private=True)
    learner.train(True)
    dp.accumulate(example_losses(learner, head, batch_of(learner, rows), distill))
    fast = dp._sum[0].clone()
    dp.close()
    # Reference: a per-example loop, each example's full gradient (task + distillation) clipped to C.
    p = learner.trainable_parameters()[0]
    ref = torch.zeros_like(p)
    reg_only = []
    for r in rows:
        g_full = torch.autograd.grad(example_losses(learner, head, batch_of(learner, [r]), distill).sum(), p)[0]
        g_task = torch.autograd.grad(example_losses(learner, head, batch_of(learner, [r])).sum(), p)[0]
        reg_only.append((g_full - g_task).norm())
        ref += g_full * min(1.0, clip / (float(g_full.norm()) + 1e-6))
        assert float(g_full.norm()) > clip  # the bound binds, so the test can see an escaped term
    assert all(abs(float(n) - 0.7) < 1e-3 for n in reg_only)  # the term's gradient has norm λ per example
    assert (fast - ref).norm() / ref.norm() < 1e-4
    assert fast.norm() <= len(rows) * clip * (1 + 1e-5)


def _spy_training(monkeypatch: pytest.MonkeyPatch, guarantee: str) -> tuple[list, list]:
    """Run AWP training and record the ascent directions and the privatised gradients of every step."""
    directions, privatised = [], []
    ascend, finish = AdversarialPerturbation.ascend, DPGradient.finish

    def spy_ascend(self, direction):  # noqa: ANN001, ANN202
        directions.append([d.detach().clone() for d in direction])
        return ascend(self, direction)

    def spy_finish(self, **kw):  # noqa: ANN003, ANN202
        out = finish(self, **kw)
        privatised.append([p.grad.detach().clone() for p in self.params])
        return out

    monkeypatch.setattr(AdversarialPerturbation, "ascend", spy_ascend)
    monkeypatch.setattr(DPGradient, "finish", spy_finish)
    if guarantee == "formal":
        def refuse(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
            raise AssertionError("formal mode asked for an un-noised private gradient")
        monkeypatch.setattr(DPGradient, "raw_gradient", refuse)
    learner = tiny_learner("tiny-bert")
    head, rows = tiny_rows(learner, 40)
    spec = TrainSpec(model="tiny-bert", method="privacy_flat", guarantee=guarantee, awp_fraction=1.0, lr=0.05,
                     batch_size=8, target_epsilon=8.0, noise_seed=3, distillation=False, layer_selection=False)
    train(learner, head, rows, spec=spec, steps=5, sample_rate=0.2, noise_multiplier=1.0, delta=1e-3, device=CPU)
    return directions, privatised


def test_formal_awp_ascends_only_along_the_previous_privatised_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    directions, privatised = _spy_training(monkeypatch, "formal")
    assert len(directions) == 4  # steps 2..5; step 1 has no privatised gradient yet
    for t, d in enumerate(directions):
        assert all(torch.equal(a, b) for a, b in zip(d, privatised[t]))


def test_empirical_awp_uses_raw_gradients_so_the_formal_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    directions, privatised = _spy_training(monkeypatch, "empirical")
    assert len(directions) == 5
    assert not any(all(torch.equal(a, b) for a, b in zip(d, privatised[t - 1]))
                   for t, d in enumerate(directions) if t > 0)


def test_formal_teacher_and_probe_never_see_private_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    learner = tiny_learner("tiny-bert")
    head, public = tiny_rows(learner, 30)  # declared public
    tok = learner.base.tokenizer
    sentinel = tok("zebra", add_special_tokens=False)["input_ids"][0]
    private = encode_classification([Example("zebra " + e.text, e.label) for e in toy_examples(30, seed=9)], tok,
                                    template=head.template, choices=["bad", "good"], max_length=32)
    assert all(sentinel in r.ids for r in private) and not any(sentinel in r.ids for r in public)
    seen: list = []
    real_teacher, real_probe = privacy_flat.train_teacher, privacy_flat.probe_loss
    monkeypatch.setattr(privacy_flat, "train_teacher", lambda lrn, h, rows, **kw: (seen.extend(rows),
                                                                                   real_teacher(lrn, h, rows, **kw))[1])
    monkeypatch.setattr(privacy_flat, "probe_loss", lambda lrn, h, rows, **kw: (seen.extend(rows),
                                                                                real_probe(lrn, h, rows, **kw))[1])
    spec = TrainSpec(model="tiny-bert", method="privacy_flat", selection_directions=1, keep_layers=1)
    initial = learner.prompt_states(1).detach().clone()
    out = privacy_flat.setup(learner, head, spec, private_rows=private, public_rows=public,
                             validation_rows=private, device=CPU)
    assert seen and not any(sentinel in r.ids for r in seen)
    assert torch.equal(learner.prompt_states(1).detach(), initial)  # the student starts untouched
    assert out.report["teacher"]["source"] == "public" and out.report["selection"]["probe"]["source"] == "public"
    with pytest.raises(InvalidSpec) as err:
        privacy_flat.setup(learner, head, spec, private_rows=private, public_rows=None, validation_rows=None,
                           device=CPU)
    assert err.value.param == "public_data"


def test_layer_selection_is_deterministic_and_reported() -> None:
    results = []
    for _ in range(2):
        learner = tiny_learner("tiny-llama")
        head, rows = tiny_rows(learner, 16)
        results.append(select_layers(learner, probe_loss(learner, head, rows, device=CPU), keep=1, rho=0.05,
                                     directions=2, seed=7))
        assert learner.kept_layers == tuple(results[-1]["kept"])
    a, b = results
    assert a == b and len(a["indicator"]) == 2 and len(a["kept"]) == 1
    assert a["kept"][0] == max(range(2), key=lambda j: a["indicator"][j])


def test_zeroth_order_runs_forward_only_and_clips(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_backward(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a backward pass ran")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    learner = tiny_learner("tiny-bert", tuning="prompt")
    head, rows = tiny_rows(learner, 40)
    graph: list[bool] = []
    learner.backbone.register_forward_hook(lambda *_: graph.append(torch.is_grad_enabled()))
    before = learner.trainable_parameters()[0].detach().clone()
    reports: list = []
    spec = TrainSpec(model="tiny-bert", tuning="prompt", trainer="zeroth_order", optimizer="sgd", lr=0.01,
                     max_grad_norm=1e-3, batch_size=8, target_epsilon=8.0, noise_seed=1)
    result = train_zeroth_order(learner, head, rows, spec=spec, steps=3, sample_rate=0.2, noise_multiplier=0.0,
                                delta=1e-3, device=CPU, callback=lambda p: reports.append(p) or None)
    assert graph and not any(graph)  # every forward ran without building a graph
    assert not torch.equal(learner.trainable_parameters()[0].detach(), before)
    assert len(result.accountant.state_dict()["events"]) >= 1
    for p in reports:  # σ = 0: |Σ clip(g_i)| / (qN) <= C · b / (qN)
        assert abs(p.metrics["projected_gradient"]) <= 1e-3 * p.metrics["examples"] / (0.2 * 40) + 1e-9
        assert p.metrics["clipped_fraction"] > 0


def test_spec_rules_for_the_guarantee() -> None:
    with pytest.raises(InvalidSpec) as err:
        TrainSpec(method="dp_prefix", guarantee="empirical")
    assert err.value.param == "guarantee"
    with pytest.raises(InvalidSpec) as err:
        TrainSpec(method="privacy_flat", awp_steps=2)  # a second ascent needs a fresh un-noised gradient
    assert err.value.param == "awp_steps"
    assert TrainSpec(method="non_private", target_epsilon=None).guarantee == "none"
    assert TrainSpec(method="privacy_flat", guarantee="empirical", awp_steps=2).guarantee == "empirical"
    assert not TrainSpec(method="privacy_flat", tuning="prompt").uses_layer_selection
