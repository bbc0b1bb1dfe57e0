"""Celery tasks: thin wrappers; the work is in :mod:`worker.runner`."""

from __future__ import annotations

from worker.app import celery_app
from worker.client import TASK


@celery_app.task(name=TASK, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    from worker.runner import run  # torch is imported here, in the worker process only

    return run(job_id)
