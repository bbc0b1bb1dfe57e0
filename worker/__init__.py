"""Celery workers: thin tasks that receive a job id, run the core pipeline, and write events, ledger spend
and artifacts. Importing this package loads no torch (the API imports ``worker.client``)."""
