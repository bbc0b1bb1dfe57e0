"""Run one job: claim it, run the core pipeline, write events / ledger spend / artifacts, end it cleanly.

Every database write is a short transaction of its own, so the API sees progress as it happens. Spend is
committed as steps complete (a crashed or cancelled job still pays for the steps it took); on any ending
the planned steps that never ran are released.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import tempfile
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import update

from core.errors import Cancelled, CoreError
from core.planning import Mechanism
from core.spec import TrainSpec
from core.train import Progress
from store import ledger, repo, webhooks
from store.db import session_scope
from store.models import CheckpointRow, FileRow, JobRow, new_id, now
from store.settings import Settings, get_settings
from store.storage import Storage, storage_from_url

log = logging.getLogger("pflat.worker")


def claim(url: str, job_id: str) -> bool:
    """queued → running, exactly once: a redelivered message finds the job no longer queued and skips it."""
    with session_scope(url) as s:
        res = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                        .values(status="running", started_at=now()))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return False
        repo.add_event(s, job_id=job_id, message="Fine-tuning job started")
        return True


class JobCallback:
    """The core's progress callback: events, incremental ledger spend, cancellation."""

    def __init__(self, url: str, job: JobRow, mech: Mechanism, every: int) -> None:
        self.url, self.job_id, self.dataset_id, self.guarantee = url, job.id, job.dataset_id, job.guarantee
        self.mech, self.every, self.recorded = mech, max(1, every), 0

    def __call__(self, p: Progress) -> bool:
        with session_scope(self.url) as s:
            job = s.get(JobRow, self.job_id)
            assert job is not None
            if p.stage == "train":
                ledger.record(s, dataset_id=self.dataset_id, job_id=self.job_id, kind="spend", mechanism=self.mech,
                              steps=p.step - self.recorded, guarantee=self.guarantee)
                self.recorded = p.step
                job.steps_done = p.step
                if p.step % self.every == 0 or p.step == p.total_steps:
                    repo.add_event(s, job_id=self.job_id, type_="metrics", message=f"Step {p.step}/{p.total_steps}",
                                   data={"step": p.step, "total_steps": p.total_steps, "train_loss": p.loss,
                                         "epsilon_spent": p.epsilon, **p.metrics})
            elif p.stage in ("prepared", "privacy_flat_setup", "evaluate", "flatness", "audit"):
                repo.add_event(s, job_id=self.job_id, message=f"Stage: {p.stage}", data=p.metrics or None)
            return not (job.cancel_requested or job.status == "cancelled")


def run(job_id: str, *, settings: Settings | None = None) -> str:
    """Run ``job_id`` if it is still queued; returns the final status (or ``skipped``)."""
    settings = settings or get_settings()
    url = settings.resolved_database_url()
    if not claim(url, job_id):
        log.info("job %s is not queued; skipping (redelivery or cancelled)", job_id)
        return "skipped"
    storage = storage_from_url(settings.resolved_storage_url())
    with session_scope(url) as s:
        job = s.get(JobRow, job_id)
        assert job is not None
        webhooks.notify(settings, url=job.webhook_url, job_id=job_id, status="running", dataset_id=job.dataset_id)
        spec, mech = TrainSpec.from_dict(job.spec), Mechanism.from_dict(job.mechanism)
        files = {k: s.get(FileRow, v) for k, v in (("train", job.training_file), ("eval", job.validation_file),
                                                    ("public", (job.method or {}).get("public_file"))) if v}
    callback = JobCallback(url, job, mech, settings.event_every_steps)
    tmp = Path(tempfile.mkdtemp(prefix=f"pflat-{job_id}-"))
    status, error = "failed", None
    try:
        paths = {k: _fetch(storage, f, tmp / f"{k}{Path(f.filename).suffix}") for k, f in files.items() if f}
        from core.pipeline import run_job  # torch loads here, in the worker only

        report = run_job(spec, train_path=paths["train"], eval_path=paths.get("eval"), out_dir=tmp / "out",
                         cache_dir=settings.cache_dir, device=settings.device, callback=callback, mechanism=mech,
                         public_path=paths.get("public"))
        _store_results(url, storage, job, tmp / "out", report)
        status = "succeeded"
    except Cancelled:
        status = "cancelled"
    except CoreError as err:
        error = {"code": err.code, "message": err.message, "param": err.param}
    except Exception as err:  # noqa: BLE001 - any failure must end the job with a clear record
        log.exception("job %s failed", job_id)
        error = {"code": "internal_error", "message": f"{type(err).__name__}: {err}",
                 "param": None, "trace": traceback.format_exc(limit=5)[-2000:]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    final = _finish(url, job, mech, status, error)
    sender = webhooks.notify(settings, url=job.webhook_url, job_id=job_id, status=final, dataset_id=job.dataset_id,
                             extra={"error": error} if error else None)
    if sender is not None:
        sender.join(timeout=60)  # a solo worker may exit after the task: let the last delivery finish
    return final


def _fetch(storage: Storage, f: FileRow, dest: Path) -> Path:
    with storage.open(f.storage_key) as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out)
    return dest


def _store_results(url: str, storage: Storage, job: JobRow, out: Path, report: dict[str, Any]) -> None:
    """Adapter as .tar.gz + privacy_report.json, stored and listed in ``result_files``."""
    archive = out / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out / "adapter", arcname="adapter")
    ids = []
    with session_scope(url) as s:
        outputs = [(archive, f"{job.id}-adapter.tar.gz"),
                   (out / "privacy_report.json", f"{job.id}-privacy_report.json"),
                   (out / "loss_landscape.png", f"{job.id}-loss_landscape.png")]
        for path, name in (o for o in outputs if o[0].exists()):
            fid = new_id("file-")
            key = f"results/{job.id}/{fid}"
            size = storage.put(key, path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            s.add(FileRow(id=fid, team_id=job.team_id, dataset_id=None, job_id=job.id, filename=name,
                          purpose="fine-tune-results", bytes=size, sha256=digest, storage_key=key))
            ids.append(fid)
        s.add(CheckpointRow(job_id=job.id, step=int(report["steps"]), metrics=report.get("metrics") or {},
                            accountant_state={"events": report.get("events", [])}, result_file=ids[0]))
        row = s.get(JobRow, job.id)
        assert row is not None
        row.result_files = ids
        row.fine_tuned_model = f"{job.model}:pflat:{job.suffix or 'adapter'}:{job.id}"


def _finish(url: str, job: JobRow, mech: Mechanism, status: str, error: dict[str, Any] | None) -> str:
    with session_scope(url) as s:
        ledger.record(s, dataset_id=job.dataset_id, job_id=job.id, kind="release", mechanism=mech,
                      steps=ledger.outstanding_steps(s, job_id=job.id), guarantee=job.guarantee)
        row = s.get(JobRow, job.id)
        assert row is not None
        if row.status == "cancelled":
            status = "cancelled"
        row.status, row.error, row.finished_at = status, error, now()
        msg = {"succeeded": "The job has successfully completed", "cancelled": "Job cancelled; unrun steps released",
               "failed": f"Job failed: {(error or {}).get('message', '')}"}[status]
        repo.add_event(s, job_id=job.id, level="error" if status == "failed" else "info", message=msg,
                       data={"status": status})
    return status
