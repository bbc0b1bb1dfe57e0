"""Dependencies: settings, a DB session per request, the calling team, the artifact store."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from api.errors import ApiError, not_found
from store import repo
from store.db import session_scope
from store.models import DatasetRow, FileRow, JobRow, Team
from store.settings import Settings, get_settings
from store.storage import Storage, storage_from_url


def get_session(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    write = request.method not in ("GET", "HEAD", "OPTIONS")
    with session_scope(settings.resolved_database_url(), write=write) as session:
        yield session


@lru_cache(maxsize=4)
def _storage(url: str) -> Storage:
    return storage_from_url(url)


def get_storage(settings: Annotated[Settings, Depends(get_settings)]) -> Storage:
    return _storage(settings.resolved_storage_url())


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]


def current_team(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Team:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "invalid_api_key", "Missing API key: send 'Authorization: Bearer <key>'.",
                       type_="authentication_error")
    team = repo.team_for_key(session, key=authorization.split(None, 1)[1].strip())
    if team is None:
        raise ApiError(401, "invalid_api_key", "Invalid API key.", type_="authentication_error")
    return team


CurrentTeam = Annotated[Team, Depends(current_team)]
Owned = TypeVar("Owned", DatasetRow, FileRow, JobRow)


def owned_or_404(session: Session, model: type[Owned], *, team: Team, ident: str, kind: str, param: str) -> Owned:
    """The team's row, or 404 (never 403: another team's ids do not exist for this one)."""
    row = repo.owned(session, model, team_id=team.id, ident=ident)
    if row is None:
        raise not_found(kind, ident, param=param)
    return row
