"""Fine-tuning jobs: estimate (dry run), create (admission against the ledger), list, retrieve, cancel,
events, checkpoints, privacy report."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import select, update

from api.deps import CurrentTeam, SessionDep, SettingsDep, StorageDep, owned_or_404
from api.errors import ApiError, not_found
from api.schemas import JobCreate, ListPage
from api.views import checkpoint_view, event_view, job_view
from core import accounting
from core.errors import InvalidSpec
from core.planning import Mechanism, calibrate
from core.registry import is_known
from core.spec import TrainSpec, check_public_data
from store import ledger, repo, webhooks
from store.models import CheckpointRow, DatasetRow, FileRow, JobRow, new_id, now
from worker.client import enqueue

router = APIRouter(tags=["fine-tuning"])
SPEC_FIELDS = {"n_epochs": "epochs", "learning_rate": "lr"}
PRIVACY_ONLY = ("target_epsilon", "max_grad_norm")
ACTIVE = ("validating_files", "queued", "running")


def _plan(req: JobCreate, team: CurrentTeam, session: SessionDep) -> tuple[TrainSpec, Mechanism, FileRow, DatasetRow]:
    """Validate a request into a TrainSpec and its calibrated mechanism (shared by create and estimate)."""
    train = repo.owned(session, FileRow, team_id=team.id, ident=req.training_file)
    if train is None or train.purpose != "fine-tune":
        raise not_found("file", req.training_file, param="training_file")
    if req.validation_file is not None:
        _companion(session, team, req.validation_file, train, "validation")
    if not is_known(req.model):
        raise ApiError(422, "model_not_found", f"unknown base model {req.model!r} (see GET /v1/models)",
                       param="model")
    if req.public_file is not None:
        pub = _companion(session, team, req.public_file, train, "public")
        if pub.dataset_id == train.dataset_id:
            raise ApiError(422, "public_file_is_private", "the public file belongs to the training file's dataset, "
                           "whose privacy budget protects it: upload public data as its own dataset",
                           param="public_file")
    dataset = session.get(DatasetRow, train.dataset_id)
    assert dataset is not None
    hyper = req.hyper().model_dump(exclude_none=True)
    private = req.method.type != "non_private"
    if hyper.get("guarantee") == "empirical" and req.method.type != "privacy_flat":
        raise ApiError(422, "guarantee_not_available", "guarantee 'empirical' needs method privacy_flat",
                       param=f"method.{req.method.type}.hyperparameters.guarantee")
    fields = {SPEC_FIELDS.get(k, k): v for k, v in hyper.items()}
    if not private:
        for key in PRIVACY_ONLY:
            fields.pop(key, None)
        fields["target_epsilon"] = None
    if fields.get("label_names") is None and (train.summary or {}).get("label_names"):
        fields["label_names"] = train.summary["label_names"]  # type: ignore[index]
    fields.setdefault("target_delta", dataset.delta)
    if fields["target_delta"] > dataset.delta:
        raise ApiError(422, "invalid_delta", f"target_delta must be <= the dataset's δ={dataset.delta:g}",
                       param=_param(req, "target_delta"))
    try:
        spec = TrainSpec(model=req.model, task=train.task or "classification", method=req.method.type,
                         seed=req.seed or 0, accountant=fields.pop("accountant", dataset.accountant), **fields)
        check_public_data(spec, has_public=req.public_file is not None)
        mech = calibrate(spec, n=train.rows or 0)
    except InvalidSpec as err:
        if err.param == "public_data":
            raise ApiError(422, "public_file_required", err.message, param="public_file") from None
        raise ApiError(422, err.code, err.message, param=_param(req, err.param)) from None
    return spec, mech, train, dataset


def _companion(session: SessionDep, team: CurrentTeam, ident: str, train: FileRow, role: str) -> FileRow:
    """A validation or public file: the team's, for fine-tuning, of the training file's task."""
    f = repo.owned(session, FileRow, team_id=team.id, ident=ident)
    if f is None or f.purpose != "fine-tune":
        raise not_found("file", ident, param=f"{role}_file")
    if f.task != train.task:
        raise ApiError(422, f"invalid_{role}_file", f"{role} file is {f.task}, training is {train.task}",
                       param=f"{role}_file")
    return f


def _param(req: JobCreate, name: str | None) -> str | None:
    if name in (None, "model", "task"):
        return name
    back = {v: k for k, v in SPEC_FIELDS.items()}
    return f"method.{req.method.type}.hyperparameters.{back.get(name or '', name)}"


@router.post("/v1/fine_tuning/jobs/estimate", summary="Dry run: noise, the job's ε, the dataset's ε after it")
def estimate(req: JobCreate, team: CurrentTeam, session: SessionDep) -> dict[str, Any]:
    spec, mech, _train, dataset = _plan(req, team, session)
    before = ledger.state(session, dataset)
    after = ledger.state(session, dataset, extra=[mech.event()])
    job_eps = accounting.epsilon([mech.event()], delta=mech.delta, accountant=spec.accountant)
    fits = dataset.epsilon_max is None or after.epsilon_reserved <= dataset.epsilon_max * (1 + 1e-9)
    return {"object": "fine_tuning.job.estimate", "noise_multiplier": mech.noise_multiplier,
            "sample_rate": mech.sample_rate, "steps": mech.steps, "delta": mech.delta,
            "epsilon": None if job_eps == float("inf") else job_eps, "guarantee": spec.guarantee,
            "dataset": dataset.id, "ledger_before": before.to_dict(), "ledger_after": after.to_dict(),
            "fits_budget": fits}


@router.post("/v1/fine_tuning/jobs", summary="Create a fine-tuning job (reserves its privacy budget)")
def create_job(req: JobCreate, team: CurrentTeam, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    spec, mech, train, dataset = _plan(req, team, session)
    # Lock the dataset row before inserting anything that references it: the job's foreign key would take a
    # share lock first, and two submissions upgrading share locks to FOR UPDATE deadlock each other.
    ledger.lock_dataset(session, dataset.id)
    job = JobRow(id=new_id("ftjob-"), team_id=team.id, dataset_id=dataset.id, training_file=train.id,
                 validation_file=req.validation_file, model=req.model, status="queued",
                 method={"type": req.method.type, "public_file": req.public_file}, spec=spec.to_dict(),
                 mechanism=mech.to_dict(),
                 guarantee=spec.guarantee, seed=spec.seed, suffix=req.suffix, metadata_=req.metadata,
                 webhook_url=req.webhook_url)
    session.add(job)
    session.flush()
    ledger.reserve(session, dataset_id=dataset.id, job_id=job.id, mechanism=mech, guarantee=spec.guarantee)
    repo.add_event(session, job_id=job.id, message=f"Created fine-tuning job: {job.id}",
                   data={"noise_multiplier": mech.noise_multiplier, "sample_rate": mech.sample_rate,
                         "steps": mech.steps, "delta": mech.delta})
    session.commit()  # the reservation is durable before any worker can see the job
    try:
        enqueue(job.id)
    except Exception as err:  # noqa: BLE001 - broker down: fail the job cleanly and give the budget back
        job.status, job.error, job.finished_at = "failed", {"code": "broker_unavailable", "message": str(err)}, now()
        ledger.record(session, dataset_id=dataset.id, job_id=job.id, kind="release", mechanism=mech,
                      steps=mech.steps, guarantee=spec.guarantee)
        session.commit()
        raise ApiError(503, "broker_unavailable", "the job queue is unavailable; nothing was spent, retry later",
                       type_="server_error") from err
    webhooks.notify(settings, url=job.webhook_url, job_id=job.id, status="queued", dataset_id=dataset.id)
    return job_view(job)


@router.get("/v1/fine_tuning/jobs", summary="List jobs (filter by status and metadata[key]=value)")
def list_jobs(request: Request, team: CurrentTeam, session: SessionDep, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 20, status: str | None = None) -> ListPage:
    filters: list[Any] = [JobRow.status == status] if status else []
    meta = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
    rows, more = repo.page(session, JobRow, team_id=team.id, after=after, limit=limit if not meta else 10_000,
                           filters=filters)
    if meta:  # JSON filtering portable across SQLite and Postgres: done here, bounded by the page above
        rows = [r for r in rows if all((r.metadata_ or {}).get(k) == v for k, v in meta.items())]
        more, rows = len(rows) > limit, rows[:limit]
    return ListPage.of([job_view(r) for r in rows], more)


def _job(session: SessionDep, team: CurrentTeam, job_id: str) -> JobRow:
    return owned_or_404(session, JobRow, team=team, ident=job_id, kind="fine_tuning_job", param="fine_tuning_job_id")


@router.get("/v1/fine_tuning/jobs/{job_id}", summary="Retrieve a job")
def retrieve_job(job_id: str, team: CurrentTeam, session: SessionDep) -> dict[str, Any]:
    return job_view(_job(session, team, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", summary="Cancel a job (steps already run stay spent)")
def cancel_job(job_id: str, team: CurrentTeam, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    job = _job(session, team, job_id)
    queued = session.execute(update(JobRow).where(JobRow.id == job.id, JobRow.status == "queued")
                             .values(status="cancelled", finished_at=now()))
    if queued.rowcount == 1:  # type: ignore[attr-defined]
        mech = Mechanism.from_dict(job.mechanism)
        ledger.record(session, dataset_id=job.dataset_id, job_id=job.id, kind="release", mechanism=mech,
                      steps=ledger.outstanding_steps(session, job_id=job.id), guarantee=job.guarantee)
        repo.add_event(session, job_id=job.id, message="Job cancelled before it started; budget released")
        webhooks.notify(settings, url=job.webhook_url, job_id=job.id, status="cancelled", dataset_id=job.dataset_id)
    else:
        running = session.execute(update(JobRow).where(JobRow.id == job.id, JobRow.status == "running")
                                  .values(status="cancelled", cancel_requested=True))
        if running.rowcount != 1:  # type: ignore[attr-defined]
            session.refresh(job)
            raise ApiError(409, "job_not_cancellable", f"job is {job.status}", param="fine_tuning_job_id")
        repo.add_event(session, job_id=job.id, message="Cancellation requested; the worker stops within a step")
    session.commit()
    session.refresh(job)
    return job_view(job)


@router.get("/v1/fine_tuning/jobs/{job_id}/events", summary="Job events, newest first")
def list_events(job_id: str, team: CurrentTeam, session: SessionDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> ListPage:
    job = _job(session, team, job_id)
    rows, more = repo.events_page(session, job_id=job.id, after=after, limit=limit)
    return ListPage.of([event_view(e) for e in rows], more)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", summary="Job checkpoints, newest first")
def list_checkpoints(job_id: str, team: CurrentTeam, session: SessionDep,
                     limit: Annotated[int, Query(ge=1, le=100)] = 10) -> ListPage:
    job = _job(session, team, job_id)
    rows = list(session.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job.id)
                                .order_by(CheckpointRow.step.desc()).limit(limit)))
    return ListPage.of([checkpoint_view(c, job) for c in rows], False)


@router.get("/v1/fine_tuning/jobs/{job_id}/report", summary="The job's privacy report (privacy_report.json)")
def job_report(job_id: str, team: CurrentTeam, session: SessionDep, storage: StorageDep) -> dict[str, Any]:
    job = _job(session, team, job_id)
    report = next((f for f in session.scalars(select(FileRow).where(FileRow.job_id == job.id))
                   if f.filename.endswith("privacy_report.json")), None)
    if report is None:
        raise ApiError(404, "report_not_ready", f"job is {job.status}; the report exists once it succeeded",
                       param="fine_tuning_job_id")
    with storage.open(report.storage_key) as fh:
        return json.loads(fh.read())
