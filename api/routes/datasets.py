"""Datasets: the unit the privacy budget protects, with its budget and append-only ledger."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import CurrentTeam, SessionDep, owned_or_404
from api.errors import ApiError
from api.schemas import DatasetUpdate, ListPage
from api.views import dataset_view
from store import ledger, repo
from store.models import DatasetRow

router = APIRouter(tags=["datasets"])


def _dataset(session: SessionDep, team: CurrentTeam, dataset_id: str) -> DatasetRow:
    return owned_or_404(session, DatasetRow, team=team, ident=dataset_id, kind="dataset", param="dataset_id")


@router.get("/v1/datasets", summary="List datasets")
def list_datasets(team: CurrentTeam, session: SessionDep, after: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> ListPage:
    rows, more = repo.page(session, DatasetRow, team_id=team.id, after=after, limit=limit)
    return ListPage.of([dataset_view(d, ledger.state(session, d).to_dict()) for d in rows], more)


@router.get("/v1/datasets/{dataset_id}", summary="A dataset, its budget and ledger totals")
def get_dataset(dataset_id: str, team: CurrentTeam, session: SessionDep) -> dict[str, Any]:
    d = _dataset(session, team, dataset_id)
    return dataset_view(d, ledger.state(session, d).to_dict())


@router.put("/v1/datasets/{dataset_id}", summary="Rename a dataset or set its budget (ε_max, δ)")
def update_dataset(dataset_id: str, req: DatasetUpdate, team: CurrentTeam, session: SessionDep) -> dict[str, Any]:
    d = ledger.lock_dataset(session, _dataset(session, team, dataset_id).id)
    if req.delta is not None and req.delta != d.delta and ledger.entries_for(session, d.id):
        raise ApiError(409, "delta_locked", "δ cannot change once the dataset has ledger entries", param="delta")
    if req.name is not None:
        d.name = req.name
    if req.delta is not None:
        d.delta = req.delta
    if req.epsilon_max is not None:
        current = ledger.state(session, d)
        if req.epsilon_max < current.epsilon_reserved:
            raise ApiError(409, "budget_below_committed", f"ε_max={req.epsilon_max:g} is below the "
                           f"ε already spent or reserved ({current.epsilon_reserved:.4g})", param="epsilon_max")
        d.epsilon_max = req.epsilon_max
    session.flush()
    return dataset_view(d, ledger.state(session, d).to_dict())


@router.get("/v1/datasets/{dataset_id}/ledger", summary="Every privacy event and the composed ε")
def get_ledger(dataset_id: str, team: CurrentTeam, session: SessionDep) -> dict[str, Any]:
    d = _dataset(session, team, dataset_id)
    entries = [{"id": e.id, "kind": e.kind, "job_id": e.job_id, "noise_multiplier": e.noise_multiplier,
                "sample_rate": e.sample_rate, "steps": e.steps, "delta": e.delta, "guarantee": e.guarantee,
                "created_at": e.created_at} for e in ledger.entries_for(session, d.id)]
    return {"object": "dataset.ledger", "dataset": d.id, "accountant": d.accountant, "entries": entries,
            **ledger.state(session, d).to_dict()}
