"""End to end through the orchestrator on tiny models: report, export, reload, honesty of the guarantee."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from core.batching import encode_classification
from core.data import Dataset, write_jsonl
from core.evaluate import predict
from core.export import load_adapter
from core.models import load_base_model
from core.pipeline import prepare, run_job
from core.spec import TrainSpec
from tests.core.helpers import toy_examples

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def toy_files(tmp_path: Path) -> dict[str, Path]:
    exs = toy_examples(80)
    files = {}
    for task in ("classification", "generation"):
        files[task] = tmp_path / f"{task}.jsonl"
        write_jsonl(Dataset(task, tuple(exs), ("bad", "good") if task == "classification" else None), files[task])
    return files


def test_dp_job_report_and_adapter_reload(toy_files: dict[str, Path], tmp_path: Path) -> None:
    spec = TrainSpec(model="tiny-bert", epochs=1, batch_size=16, lr=0.1, target_epsilon=4.0, seed=2, noise_seed=5)
    out = tmp_path / "run"
    rep = run_job(spec, train_path=toy_files["classification"], eval_path=toy_files["classification"],
                  out_dir=out, cache_dir=tmp_path, device="cpu")
    saved = json.loads((out / "privacy_report.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant", "max_grad_norm",
                "guarantee", "metrics", "config", "versions"):
        assert key in saved, key
    assert saved["guarantee"] == "formal" and 0 < saved["epsilon"] <= 4.0 * 1.0001
    assert saved["noise_seeded"] and "seed stays secret" in saved["guarantee_note"]
    assert saved["delta"] < 1 / 80 and saved["versions"]["torch"].startswith("2.13")
    assert TrainSpec.from_dict(saved["config"]) == spec
    assert set(saved["metrics"]) >= {"accuracy", "macro_f1", "loss"}
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()

    # Reload onto a fresh base model: same predictions as the in-memory model.
    prep = prepare(spec, train_path=toy_files["classification"], eval_path=None, cache_dir=tmp_path, device="cpu")
    base = load_base_model("tiny-bert", cache_dir=tmp_path, seed=spec.seed)
    learner, head, meta = load_adapter(base, out / "adapter")
    assert head is not None and meta["label_names"] == ["bad", "good"]
    rows = encode_classification(prep.train_set.examples[:20], base.tokenizer, template=head.template,
                                 choices=["bad", "good"], max_length=32)
    reloaded, _ = predict(learner, head, rows, device=torch.device("cpu"))
    assert isinstance(learner.peft_model, PeftModel)
    assert rep["metrics"]["examples"] == 80
    # The in-memory model of the run is gone; re-run the same seed and compare its exported weights' predictions.
    torch.testing.assert_close(learner.prompt_encoder.embedding.weight,
                               _saved_prefix(out / "adapter"), rtol=0, atol=0)
    again, _ = predict(learner, head, rows, device=torch.device("cpu"))
    torch.testing.assert_close(reloaded, again)


def _saved_prefix(adapter: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    return next(iter(load_file(str(adapter / "adapter_model.safetensors")).values()))


def test_in_memory_and_reloaded_predictions_agree(toy_files: dict[str, Path], tmp_path: Path) -> None:
    from core.planning import calibrate
    from core.train import train

    spec = TrainSpec(model="tiny-llama", epochs=1, batch_size=16, lr=0.3, target_epsilon=8.0, seed=4)
    prep = prepare(spec, train_path=toy_files["classification"], eval_path=None, cache_dir=tmp_path, device="cpu")
    mech = calibrate(spec, n=len(prep.rows))
    train(prep.learner, prep.head, prep.rows, spec=spec, steps=mech.steps, sample_rate=mech.sample_rate,
          noise_multiplier=mech.noise_multiplier, delta=mech.delta, device=torch.device("cpu"))
    assert prep.head is not None
    before, _ = predict(prep.learner, prep.head, prep.rows, device=torch.device("cpu"))
    from core.export import save_adapter
    save_adapter(prep.learner, prep.head, tmp_path, label_names=["bad", "good"], num_labels=2,
                 spec=spec.to_dict())
    base = load_base_model("tiny-llama", cache_dir=tmp_path, seed=spec.seed)
    learner, head, _ = load_adapter(base, tmp_path / "adapter")
    assert head is not None
    after, _ = predict(learner, head, prep.rows, device=torch.device("cpu"))
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def test_non_private_report_claims_no_guarantee(toy_files: dict[str, Path], tmp_path: Path) -> None:
    spec = TrainSpec(model="tiny-llama", task="generation", method="non_private", target_epsilon=None,
                     epochs=1, batch_size=32, lr=0.05, max_new_tokens=4, eval_max_examples=6)
    rep = run_job(spec, train_path=toy_files["generation"], eval_path=toy_files["generation"],
                  out_dir=tmp_path / "np", cache_dir=tmp_path, device="cpu")
    assert rep["guarantee"] == "none" and rep["epsilon"] is None and rep["noise_multiplier"] == 0.0
    assert "No formal" in rep["guarantee_note"]
    m = rep["metrics"]
    assert math.isfinite(m["loss"]) and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert 0 <= m["bleu"] <= 100 and 0 <= m["rouge_l"] <= 100


@pytest.mark.parametrize("content,needle", [
    (b'{"text": "ok", "label": 0}\n{"text": "fine"}\n', "line 2"),
    (b"", "empty"),
    (b'{"text": "ok", "label": 0}\n\xff\xfe\n', "line 2"),
    (b'{"text": "ok", "label": 0.5}\n{"text": "x", "label": 1}\n', "line 1"),
])
def test_cli_reports_bad_data_without_traceback(tmp_path: Path, content: bytes, needle: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "cli.main", "train", "--data", str(bad), "--model", "tiny-bert",
                           "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "invalid_dataset" in proc.stderr and needle in proc.stderr


def test_cli_reports_bad_settings_without_traceback(toy_files: dict[str, Path], tmp_path: Path) -> None:
    for args, param in ((["--epsilon", "-1"], "target_epsilon"), (["--model", "nope"], "model"),
                        (["--delta", "0.5"], "target_delta")):
        proc = subprocess.run([sys.executable, "-m", "cli.main", "train", "--data", str(toy_files["classification"]),
                               "--model", "tiny-bert", *args, "--out", str(tmp_path / "o"), "--quiet"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and param in proc.stderr, proc.stderr


def test_privacy_flat_formal_job_end_to_end(toy_files: dict[str, Path], tmp_path: Path) -> None:
    public = tmp_path / "public.jsonl"
    write_jsonl(Dataset("classification", tuple(toy_examples(40)[::-1]), ("bad", "good")), public)
    spec = TrainSpec(model="tiny-bert", method="privacy_flat", epochs=1, batch_size=16, lr=0.1, target_epsilon=4.0,
                     keep_layers=1, selection_directions=1, selection_probe=8, audit_fraction=0.25, noise_seed=1)
    out = tmp_path / "pf"
    rep = run_job(spec, train_path=toy_files["classification"], eval_path=toy_files["classification"], out_dir=out,
                  cache_dir=tmp_path, device="cpu", public_path=public)
    pf = rep["privacy_flat"]
    assert rep["guarantee"] == "formal" and 0 < rep["epsilon"] <= 4.0 * 1.0001
    assert rep["epsilon"] == rep["mechanism_epsilon"] and "public data file" in rep["guarantee_note"]
    assert pf["teacher"]["source"] == "public" and pf["selection"]["probe"]["source"] == "public"
    assert len(pf["selection"]["indicator"]) == 2 and len(pf["selection"]["kept"]) == 1
    assert pf["awp_run"]["direction"].startswith("previous privatised")
    assert rep["audit"]["non_members"] == 20 and 0 <= rep["audit"]["mia_auc"] <= 1
    # The exported adapter carries the layer choice; reloading applies it and predicts the same.
    base = load_base_model("tiny-bert", cache_dir=tmp_path, seed=spec.seed)
    learner, head, meta = load_adapter(base, out / "adapter")
    assert meta["kept_layers"] == pf["selection"]["kept"] and learner.kept_layers == tuple(meta["kept_layers"])


def test_privacy_flat_empirical_report_has_no_formal_bound(toy_files: dict[str, Path], tmp_path: Path) -> None:
    spec = TrainSpec(model="tiny-llama", method="privacy_flat", guarantee="empirical", epochs=1, batch_size=16,
                     lr=0.1, target_epsilon=4.0, selection_directions=1, selection_probe=8, awp_steps=2)
    rep = run_job(spec, train_path=toy_files["classification"], eval_path=None, out_dir=tmp_path / "emp",
                  cache_dir=tmp_path, device="cpu")
    assert rep["guarantee"] == "empirical" and rep["epsilon"] is None and rep["delta"] is None
    assert 0 < rep["mechanism_epsilon"] <= 4.0 * 1.0001
    note = rep["guarantee_note"]
    assert note.startswith("No formal") and "raw, un-noised" in note and "trained on the private data" in note
    assert rep["privacy_flat"]["teacher"]["source"] == "private"
    assert rep["privacy_flat"]["selection"]["probe"]["source"] == "private"


def test_cli_privacy_flat_formal_needs_public_data(toy_files: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli.main", "train", "--data", str(toy_files["classification"]),
                           "--model", "tiny-bert", "--method", "privacy_flat", "--out", str(tmp_path / "o"),
                           "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "public_data" in proc.stderr and "empirical" in proc.stderr
