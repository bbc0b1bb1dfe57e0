"""Real offline models on small real data (SST-2, E2E). Sized to run in CI within a few minutes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.batching import encode_classification, encode_generation
from core.data import load_dataset
from core.dp import DPGradient
from core.heads import build_head
from core.models import load_base_model
from core.objective import classification_losses, completion_losses
from core.pipeline import GENERATION_TEMPLATE, run_job
from core.prompting import build_learner
from core.spec import TrainSpec
from core.train import trainable_module
from tests.core.helpers import batch_of

pytestmark = pytest.mark.slow


def _check_per_sample(learner, head, rows, task):  # noqa: ANN001, ANN202
    dp = DPGradient(trainable_module(learner, head), max_grad_norm=1e9, noise_multiplier=0.0, private=True)
    learner.train(True)

    def loss_of(batch):  # noqa: ANN001, ANN202
        return classification_losses(learner, head, batch)[0] if task == "classification" \
            else completion_losses(learner, batch)[0]

    loss_of(batch_of(learner, rows)).sum().backward()
    fast = [p.grad_sample.detach().clone() for p in dp.params]
    for i, r in enumerate(rows):
        slow = torch.autograd.grad(loss_of(batch_of(learner, [r])).sum(), dp.params)
        for f, s in zip(fast, slow):
            rel = float((f[i] - s).norm() / s.norm())
            assert rel < 1e-4, rel


def test_minilm_per_sample_gradients_exact(datasets: Path, cache_dir: Path) -> None:
    base = load_base_model("minilm", cache_dir=cache_dir)
    learner = build_learner(base, tuning="prefix", num_virtual_tokens=5)
    head = build_head(learner, num_labels=2, label_names=["terrible", "great"])
    ds = load_dataset(datasets / "sst2" / "dev.tsv", task="classification", max_rows=40)
    rows = encode_classification(ds.examples[:4], base.tokenizer, template=head.template, choices=["terrible", "great"],
                                 max_length=64)
    _check_per_sample(learner, head, rows, "classification")


def test_smollm2_per_sample_gradients_exact(datasets: Path, cache_dir: Path) -> None:
    base = load_base_model("smollm2-135m", cache_dir=cache_dir)
    assert (cache_dir / "smollm2-135m" / "model.safetensors").exists()  # converted once, cached
    learner = build_learner(base, tuning="prefix", num_virtual_tokens=4)
    ds = load_dataset(datasets / "e2e" / "devset.csv", task="generation", max_rows=3)
    rows = encode_generation(ds.examples, base.tokenizer, template=GENERATION_TEMPLATE, max_length=48)
    _check_per_sample(learner, None, rows, "generation")


def test_minilm_dp_job_on_sst2_sample(datasets: Path, cache_dir: Path, tmp_path: Path) -> None:
    """A small DP run stays a working classifier (the verbalizer head starts pretrained) and exports."""
    spec = TrainSpec(model="minilm", label_names=("terrible", "great"), target_epsilon=8.0, epochs=2,
                     batch_size=64, lr=0.05, eval_max_examples=200, seed=0)
    rep = run_job(spec, train_path=datasets / "sst2" / "train.tsv", eval_path=datasets / "sst2" / "dev.tsv",
                  out_dir=tmp_path, cache_dir=cache_dir, device="cpu", max_rows=300)
    assert rep["guarantee"] == "formal" and rep["epsilon"] <= 8.0
    assert rep["zero_shot_metrics"]["accuracy"] > 0.65
    assert rep["metrics"]["accuracy"] > 0.6
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_smollm2_dp_generation_job_on_e2e_sample(datasets: Path, cache_dir: Path, tmp_path: Path) -> None:
    spec = TrainSpec(model="smollm2-135m", task="generation", target_epsilon=8.0, max_steps=2, batch_size=16,
                     physical_batch_size=8, lr=0.01, max_length=64, max_new_tokens=12, eval_max_examples=12)
    rep = run_job(spec, train_path=datasets / "e2e" / "devset.csv", eval_path=datasets / "e2e" / "testset_w_refs.csv",
                  out_dir=tmp_path, cache_dir=cache_dir, device="cpu", max_rows=64)
    m = rep["metrics"]
    assert rep["steps"] == 2 and rep["epsilon"] <= 8.0
    assert 1.0 < m["perplexity"] < 1e4 and 0 <= m["bleu"] <= 100 and m["prompts"] >= 1
    assert any(s["output"] for s in m["samples"])
