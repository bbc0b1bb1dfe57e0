"""The Celery app. Broker: Redis in production, kombu's SQLAlchemy transport on SQLite embedded.

``acks_late`` + ``reject_on_worker_lost``: a message is acknowledged only after the job ran, so a crashed
worker's job is redelivered; the task claims the job with a guarded status update, so a redelivered message
never runs a job twice. The visibility timeout is longer than any job.
"""

from __future__ import annotations

from celery import Celery

from store.settings import get_settings


def make_app() -> Celery:
    settings = get_settings()
    broker = settings.resolved_broker_url()
    app = Celery("pflat", broker=broker, include=["worker.tasks"])
    # kombu's SQLAlchemy transport hands its transport options to create_engine; Redis takes the timeout.
    options = ({"connect_args": {"timeout": 30}} if broker.startswith("sqla+") else
               {"visibility_timeout": settings.visibility_timeout_s})
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="pflat",
        broker_connection_retry_on_startup=True,
        broker_transport_options=options,
        broker_pool_limit=None if broker.startswith("sqla+") else 10,
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_app()
