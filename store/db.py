"""Engine and sessions. SQLite gets WAL + a busy timeout so the API and a worker can share the file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

# FastAPI runs sync dependencies (and their teardown) on a 40-thread pool: with fewer connections than threads,
# requests waiting for a connection can starve the teardowns that would return one (a deadlock until the pool
# timeout). 10 + 40 connections per process keep every thread supplied.
POOL_OVERFLOW = 40


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=10,
                               max_overflow=POOL_OVERFLOW)

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # noqa: ANN001, ANN202
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.isolation_level = None  # we issue BEGIN ourselves (see below)

        @event.listens_for(engine, "begin")
        def _begin(conn):  # noqa: ANN001, ANN202
            # Writing sessions BEGIN IMMEDIATE, taking the write lock up front: two submissions cannot both read
            # the ledger and then both write (SQLite's stand-in for SELECT ... FOR UPDATE on the dataset row).
            # Reading sessions BEGIN (deferred) and never wait for a writer under WAL.
            immediate = conn.get_execution_options().get("sqlite_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=POOL_OVERFLOW)


@lru_cache(maxsize=16)
def session_factory(url: str, *, write: bool = True) -> sessionmaker[Session]:
    """Sessions on ``url``; ``write=False`` sessions (GET requests) take no write lock on SQLite."""
    engine = engine_for(url)
    if write and engine.dialect.name == "sqlite":
        engine = engine.execution_options(sqlite_immediate=True)  # type: ignore[assignment]
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(url: str, *, write: bool = True) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (requests, workers, commands)."""
    session = session_factory(url, write=write)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
