"""Artifacts: a PEFT adapter folder (``PeftModel.from_pretrained`` loads it onto the base model), our head's
description beside it, and ``privacy_report.json``."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.heads import Head, LinearHead, build_head
from core.models import BaseModel
from core.prompting import PromptLearner, load_learner

HEAD_FILE = "pflat_head.json"
HEAD_WEIGHTS = "pflat_head.safetensors"
REPORT_FILE = "privacy_report.json"
KEY_PACKAGES = ("torch", "transformers", "peft", "opacus", "dp-accounting", "tokenizers", "numpy", "sacrebleu",
                "rouge-score", "safetensors")


def versions() -> dict[str, str]:
    """Python and every key package's installed version."""
    out = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_adapter(learner: PromptLearner, head: Head | None, out_dir: Path, *, label_names: list[str] | None,
                 num_labels: int | None, spec: dict[str, Any]) -> Path:
    """Write the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and our head file."""
    adapter = out_dir / "adapter"
    cols = learner.layer_columns()
    if cols is not None and learner.layer_removal == "zero":  # what the model saw, so plain PEFT loading agrees
        with torch.no_grad():
            learner.prompt_encoder.embedding.weight.mul_(cols.to(learner.prompt_encoder.embedding.weight))
    learner.peft_model.save_pretrained(str(adapter))
    # Sparse prefix: a plain PeftModel load uses every layer; for `mask` removal the removed layers hold their
    # initial attention-sink copies (close to a no-op), and load_adapter re-applies the mask exactly.
    meta = {"head": head.describe() if head is not None else None, "label_names": label_names, "num_labels": num_labels,
            "tuning": learner.tuning, "task": spec.get("task"), "model": spec.get("model"),
            "kept_layers": list(learner.kept_layers) if learner.kept_layers is not None else None,
            "layer_removal": learner.layer_removal, "pflat_versions": versions()}
    (adapter / HEAD_FILE).write_text(json.dumps(meta, indent=2))
    if isinstance(head, LinearHead):
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(adapter / HEAD_WEIGHTS))
    return adapter


def load_adapter(base: BaseModel, adapter_dir: Path) -> tuple[PromptLearner, Head | None, dict[str, Any]]:
    """Reload an exported adapter and its head onto ``base``; the head is None for generation adapters."""
    meta = json.loads((adapter_dir / HEAD_FILE).read_text())
    learner = load_learner(base, str(adapter_dir), tuning=meta["tuning"])
    if meta.get("kept_layers") is not None:
        learner.set_layers(meta["kept_layers"], removal=meta.get("layer_removal", "mask"))
    head: Head | None = None
    if meta["task"] == "classification":
        h = meta["head"]
        head = build_head(learner, num_labels=meta["num_labels"], label_names=meta["label_names"],
                          template=h["template"], kind=h["kind"])
        if isinstance(head, LinearHead):
            head.load_state_dict(load_file(str(adapter_dir / HEAD_WEIGHTS)))
    return learner, head, meta


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return None
    return str(value)
