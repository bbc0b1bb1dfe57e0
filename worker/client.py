"""Enqueue jobs (used by the API; torch-free)."""

from __future__ import annotations

from worker.app import celery_app

TASK = "pflat.run_job"


def enqueue(job_id: str) -> None:
    """Send the job id to the workers. The task only ever receives the id and reads the rest itself."""
    celery_app.send_task(TASK, args=[job_id], task_id=f"run-{job_id}")
