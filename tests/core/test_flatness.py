"""Flatness measurement: exact on a quadratic, restores weights bit for bit, deterministic, wired into runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from core.flatness import measure, plot


def test_gradient_sharpness_is_exact_on_a_quadratic(tmp_path: Path) -> None:
    w = nn.Parameter(torch.linspace(0.5, 2.0, 50))
    before = w.detach().clone()

    def loss() -> torch.Tensor:
        return 0.5 * (w**2).sum()

    rho = 0.1
    out = measure(loss, [w], rho=rho, random_directions=8, seed=1)
    norm2 = float((before**2).sum())
    # gradient = w, so the step is ρ·w: L(w(1+ρ)) − L(w) = (ρ + ρ²/2)‖w‖²
    assert out["sharpness_gradient"] == pytest.approx((rho + rho**2 / 2) * norm2, rel=1e-5)
    # random directions: E[w·d] = 0, so the rise averages ½ρ²‖w‖² give or take the w·d term
    assert abs(out["sharpness_random"]) < out["sharpness_gradient"]
    assert torch.equal(w.detach(), before)  # restored bit for bit
    zero = dict(out["curves"]["gradient"])[0.0]
    assert zero == pytest.approx(out["loss"])
    again = measure(loss, [w], rho=rho, random_directions=8, seed=1)
    assert again == out
    assert plot(out, tmp_path / "l.png").stat().st_size > 1000


def test_run_reports_flatness_and_plot(tmp_path: Path) -> None:
    from core.data import Dataset, write_jsonl
    from core.pipeline import run_job
    from core.spec import TrainSpec
    from tests.core.helpers import toy_examples

    data = tmp_path / "d.jsonl"
    write_jsonl(Dataset("classification", tuple(toy_examples(40)), ("bad", "good")), data)
    spec = TrainSpec(model="tiny-bert", max_steps=2, batch_size=10, target_epsilon=5.0, flatness_probe=16)
    rep = run_job(spec, train_path=data, eval_path=data, out_dir=tmp_path / "o", cache_dir=tmp_path, device="cpu")
    flat = rep["flatness"]
    assert flat["rho"] == 0.05 and len(flat["curves"]["random"]) == 7
    assert flat["sharpness_gradient"] > 0  # first order: moving along the gradient raises the loss
    assert (tmp_path / "o" / "loss_landscape.png").exists()
