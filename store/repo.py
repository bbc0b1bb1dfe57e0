"""Service functions over the models: teams and keys, datasets, files, jobs, events. Keyword-only arguments,
no FastAPI, no torch; every read is scoped to a team (another team's rows are simply not found)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import ApiKey, DatasetRow, FileRow, JobEventRow, JobRow, Team

T = TypeVar("T", DatasetRow, FileRow, JobRow)
KEY_PREFIX = "pf-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_team(session: Session, *, name: str) -> Team:
    team = Team(name=name)
    session.add(team)
    session.flush()
    return team


def team_by_name_or_id(session: Session, *, ref: str) -> Team | None:
    return session.scalars(select(Team).where((Team.id == ref) | (Team.name == ref))).first()


def create_key(session: Session, *, team: Team) -> str:
    """Make an API key; only its sha256 is stored, so the key is shown once."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(team_id=team.id, prefix=key[:10], key_hash=hash_key(key)))
    session.flush()
    return key


def team_for_key(session: Session, *, key: str) -> Team | None:
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(False))).first()
    return session.get(Team, row.team_id) if row else None


def owned(session: Session, model: type[T], *, team_id: str, ident: str) -> T | None:
    """The row with ``ident`` if ``team_id`` owns it, else None (callers answer 404, never 403)."""
    row = session.get(model, ident)
    if row is None or row.team_id != team_id or getattr(row, "deleted", False):
        return None
    return row


def page(session: Session, model: type[T], *, team_id: str, after: str | None, limit: int,
         filters: Sequence[Any] = ()) -> tuple[list[T], bool]:
    """Newest first, cursor after the row ``after``; returns (rows, has_more)."""
    stmt = select(model).where(model.team_id == team_id, *filters)
    if hasattr(model, "deleted"):
        stmt = stmt.where(model.deleted.is_(False))  # type: ignore[union-attr]
    if after:
        cursor = session.get(model, after)
        if cursor is not None:
            stmt = stmt.where((model.created_at < cursor.created_at) |
                              ((model.created_at == cursor.created_at) & (model.id < cursor.id)))
    rows = list(session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def add_event(session: Session, *, job_id: str, message: str, level: str = "info", type_: str = "message",
              data: dict[str, Any] | None = None) -> JobEventRow:
    seq = (session.scalar(select(func.max(JobEventRow.seq)).where(JobEventRow.job_id == job_id)) or 0) + 1
    ev = JobEventRow(job_id=job_id, seq=seq, message=message, level=level, type=type_, data=data)
    session.add(ev)
    session.flush()
    return ev


def events_page(session: Session, *, job_id: str, after: str | None, limit: int) -> tuple[list[JobEventRow], bool]:
    """Newest first (as OpenAI lists events); cursor is an event id."""
    stmt = select(JobEventRow).where(JobEventRow.job_id == job_id)
    if after:
        cursor = session.get(JobEventRow, after)
        if cursor is not None:
            stmt = stmt.where(JobEventRow.seq < cursor.seq)
    rows = list(session.scalars(stmt.order_by(JobEventRow.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def create_dataset(session: Session, *, team_id: str, name: str, epsilon_max: float | None, delta: float) -> DatasetRow:
    ds = DatasetRow(team_id=team_id, name=name, epsilon_max=epsilon_max, delta=delta)
    session.add(ds)
    session.flush()
    return ds
