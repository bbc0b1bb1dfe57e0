"""The FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.routes import datasets, files, jobs, models

DESCRIPTION = """
Private fine-tuning of language models with DP-SGD prefix tuning (Privacy-Flat).

Upload a dataset (`POST /v1/files`), check the privacy cost (`POST /v1/fine_tuning/jobs/estimate`), submit a
job, poll it and its events, then download the adapter archive and `privacy_report.json` listed in
`result_files`. Every dataset has a budget (ε_max, δ) and an append-only **ledger**: a job that would
exceed the budget is refused with 409 before anything runs. Resource shapes follow OpenAI's fine-tuning
API, so the official `openai` client works unchanged. Authenticate with `Authorization: Bearer <key>`.
"""


def create_app() -> FastAPI:
    app = FastAPI(title="Privacy-Flat Service", version="0.1.0", description=DESCRIPTION)
    errors.install(app)
    for router in (files.router, jobs.router, datasets.router, models.router):
        app.include_router(router)

    @app.get("/healthz", tags=["ops"], summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


app = create_app()
