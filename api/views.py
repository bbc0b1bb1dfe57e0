"""Rows → OpenAI-shaped JSON objects."""

from __future__ import annotations

from typing import Any

from store.models import CheckpointRow, DatasetRow, FileRow, JobEventRow, JobRow


def file_view(f: FileRow) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None, "expires_at": None,
            "dataset": f.dataset_id, "sha256": f.sha256, "task": f.task, "rows": f.rows, "summary": f.summary}


def job_view(j: JobRow) -> dict[str, Any]:
    spec, mech = j.spec, j.mechanism
    hyper = {"n_epochs": spec.get("epochs"), "batch_size": spec.get("batch_size"),
             "learning_rate": spec.get("lr"), "num_virtual_tokens": spec.get("num_virtual_tokens"),
             "tuning": spec.get("tuning"), "target_epsilon": spec.get("target_epsilon"),
             "target_delta": mech.get("delta"), "max_grad_norm": spec.get("max_grad_norm"),
             "accountant": spec.get("accountant"), "guarantee": j.guarantee}
    if j.method.get("type") == "privacy_flat":
        hyper.update({k: spec.get(k) for k in ("awp", "awp_gamma", "awp_fraction", "layer_selection", "keep_layers",
                                               "layer_removal", "distillation", "distill_lambda", "trainer")})
    return {
        "id": j.id, "object": "fine_tuning.job", "created_at": j.created_at, "error": j.error,
        "fine_tuned_model": j.fine_tuned_model, "finished_at": j.finished_at, "model": j.model,
        "hyperparameters": {k: hyper[k] for k in ("n_epochs", "batch_size", "learning_rate")},
        "method": {"type": j.method.get("type"), j.method.get("type"): {"hyperparameters": hyper}},
        "organization_id": j.team_id, "result_files": j.result_files or [], "seed": j.seed, "status": j.status,
        "trained_tokens": None, "training_file": j.training_file, "validation_file": j.validation_file,
        "public_file": j.method.get("public_file"),
        "integrations": [], "metadata": j.metadata_, "estimated_finish": None, "suffix": j.suffix,
        "user_provided_suffix": j.suffix, "dataset": j.dataset_id,
        "privacy": {"guarantee": j.guarantee, "noise_multiplier": mech.get("noise_multiplier"),
                    "sample_rate": mech.get("sample_rate"), "planned_steps": mech.get("steps"),
                    "steps_done": j.steps_done, "delta": mech.get("delta"), "accountant": spec.get("accountant")},
    }


def event_view(e: JobEventRow) -> dict[str, Any]:
    return {"id": e.id, "object": "fine_tuning.job.event", "created_at": e.created_at, "level": e.level,
            "message": e.message, "data": e.data or {}, "type": e.type}


def checkpoint_view(c: CheckpointRow, job: JobRow) -> dict[str, Any]:
    return {"id": c.id, "object": "fine_tuning.job.checkpoint", "created_at": c.created_at,
            "fine_tuned_model_checkpoint": c.result_file or "", "fine_tuning_job_id": job.id,
            "metrics": c.metrics, "step_number": c.step, "accountant_state": c.accountant_state}


def dataset_view(d: DatasetRow, ledger: dict[str, Any]) -> dict[str, Any]:
    return {"id": d.id, "object": "dataset", "name": d.name, "created_at": d.created_at,
            "budget": {"epsilon_max": d.epsilon_max, "delta": d.delta, "accountant": d.accountant}, "ledger": ledger}
