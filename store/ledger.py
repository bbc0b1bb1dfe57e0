"""The privacy ledger: per dataset, an append-only list of privacy events.

A dataset's ε is the *composition* of its events under the core accountant (never a sum). Three kinds of
entries: ``reserve`` (a job's planned steps, written at submission), ``spend`` (steps that actually ran,
written as they complete) and ``release`` (planned steps that will never run). A job's outstanding
reservation is reserve − spend − release; admission composes spend + outstanding + the new job's plan.
Admission runs in one transaction that locks the dataset row (``SELECT ... FOR UPDATE`` on Postgres, the
``BEGIN IMMEDIATE`` write lock on SQLite), so concurrent submissions cannot overspend.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import accounting
from core.errors import BudgetExceeded
from core.planning import Mechanism
from store.models import DatasetRow, LedgerEntry


@dataclass(frozen=True)
class LedgerState:
    epsilon_spent: float
    epsilon_reserved: float  # spent + outstanding reservations, composed
    epsilon_max: float | None
    delta: float
    formal_guarantee: bool

    @property
    def epsilon_remaining(self) -> float | None:
        """ε_max minus the composed committed ε (a headroom figure: ε does not add up linearly)."""
        return None if self.epsilon_max is None else max(0.0, self.epsilon_max - self.epsilon_reserved)

    def to_dict(self) -> dict[str, Any]:
        def fin(x: float | None) -> float | None:
            return None if x is None or math.isinf(x) else x
        return {"epsilon_spent": fin(self.epsilon_spent), "epsilon_reserved": fin(self.epsilon_reserved),
                "epsilon_max": self.epsilon_max, "epsilon_remaining": fin(self.epsilon_remaining),
                "delta": self.delta, "formal_guarantee": self.formal_guarantee,
                "unbounded": math.isinf(self.epsilon_reserved)}


def _events(entries: list[LedgerEntry]) -> tuple[list[accounting.PrivacyEvent], list[accounting.PrivacyEvent]]:
    """(spent events, outstanding reserved events) from a dataset's entries."""
    spent: list[accounting.PrivacyEvent] = []
    outstanding: dict[str, int] = defaultdict(int)
    mech: dict[str, tuple[float, float]] = {}
    for e in entries:
        mech[e.job_id] = (e.noise_multiplier, e.sample_rate)
        if e.kind == "reserve":
            outstanding[e.job_id] += e.steps
        else:
            outstanding[e.job_id] -= e.steps
            if e.kind == "spend":
                spent.append(accounting.PrivacyEvent(e.noise_multiplier, e.sample_rate, e.steps))
    pending = [accounting.PrivacyEvent(*mech[j], s) for j, s in outstanding.items() if s > 0]
    return spent, pending


def entries_for(session: Session, dataset_id: str) -> list[LedgerEntry]:
    return list(session.scalars(select(LedgerEntry).where(LedgerEntry.dataset_id == dataset_id)
                                .order_by(LedgerEntry.id)))


def state(session: Session, dataset: DatasetRow, *, extra: list[accounting.PrivacyEvent] | None = None) -> LedgerState:
    """The dataset's composed ε spent and reserved (plus ``extra`` planned events, for estimates)."""
    spent, pending = _events(entries_for(session, dataset.id))
    eps = accounting.epsilon(spent, delta=dataset.delta, accountant=dataset.accountant)
    committed = accounting.epsilon(spent + pending + list(extra or []), delta=dataset.delta,
                                   accountant=dataset.accountant)
    return LedgerState(eps, committed, dataset.epsilon_max, dataset.delta, not dataset.formal_void)


def lock_dataset(session: Session, dataset_id: str) -> DatasetRow:
    """Lock the dataset row for the rest of the transaction (no-op on SQLite, which locks the database)."""
    stmt = select(DatasetRow).where(DatasetRow.id == dataset_id)
    if session.get_bind().dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).one()
    session.refresh(row)
    return row


def reserve(session: Session, *, dataset_id: str, job_id: str, mechanism: Mechanism, guarantee: str) -> LedgerState:
    """Check the job fits the budget and append its reservation, under the dataset lock (caller commits).

    Raises:
        BudgetExceeded: composing the job's plan with what is spent and reserved exceeds ``epsilon_max``.
    """
    dataset = lock_dataset(session, dataset_id)
    after = state(session, dataset, extra=[mechanism.event()])
    if dataset.epsilon_max is not None and after.epsilon_reserved > dataset.epsilon_max * (1 + 1e-9):
        before = state(session, dataset)
        err = BudgetExceeded(
            f"this job would bring dataset {dataset.id} to ε={after.epsilon_reserved:.4g} > ε_max="
            f"{dataset.epsilon_max:g} (spent {before.epsilon_spent:.4g}, reserved {before.epsilon_reserved:.4g})",
            param="method.privacy.target_epsilon")
        err.detail = before.to_dict()  # type: ignore[attr-defined]
        raise err
    session.add(_entry(dataset_id, job_id, "reserve", mechanism, mechanism.steps, guarantee))
    if guarantee != "formal":
        dataset.formal_void = True
    session.flush()
    return after


def record(session: Session, *, dataset_id: str, job_id: str, kind: str, mechanism: Mechanism, steps: int,
           guarantee: str) -> None:
    """Append a ``spend`` or ``release`` entry of ``steps`` steps (no-op for 0 steps)."""
    if steps > 0:
        session.add(_entry(dataset_id, job_id, kind, mechanism, steps, guarantee))


def outstanding_steps(session: Session, *, job_id: str) -> int:
    rows = session.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id))
    return sum(e.steps if e.kind == "reserve" else -e.steps for e in rows)


def _entry(dataset_id: str, job_id: str, kind: str, m: Mechanism, steps: int, guarantee: str) -> LedgerEntry:
    return LedgerEntry(dataset_id=dataset_id, job_id=job_id, kind=kind, noise_multiplier=m.noise_multiplier,
                       sample_rate=m.sample_rate, steps=steps, delta=m.delta, guarantee=guarantee)
