"""``pflat serve``, ``pflat worker``, ``pflat db upgrade``, ``pflat admin ...``."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import Any


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("serve", help="Apply migrations, start the API and (by default) one worker.")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-only", action="store_true", help="no worker in this process group")
    w = sub.add_parser("worker", help="Start a Celery worker (one job at a time per process).")
    w.add_argument("--concurrency", type=int, default=1)
    db = sub.add_parser("db", help="Database commands.").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="Apply Alembic migrations up to head.")
    admin = sub.add_parser("admin", help="Teams and API keys.").add_subparsers(dest="admin_command", required=True)
    t = admin.add_parser("create-team", help="Create a team.")
    t.add_argument("name")
    k = admin.add_parser("create-key", help="Create an API key for a team (printed once).")
    k.add_argument("team", help="team name or id")
    admin.add_parser("webhook-secret", help="Print the HMAC secret that signs webhooks.")


def worker_command(concurrency: int = 1) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.app:celery_app", "worker", "--loglevel", "INFO",
            "--pool", "solo" if concurrency == 1 else "prefork", "--concurrency", str(concurrency),
            "-Q", "pflat", "--without-gossip", "--without-mingle", "--without-heartbeat"]


def run(args: argparse.Namespace) -> int:
    from store.settings import get_settings

    settings = get_settings()
    url = settings.resolved_database_url()
    if args.command == "db":
        from store.migrate import upgrade

        upgrade(url)
        print(f"database at head: {_safe(url)}")
        return 0
    if args.command == "admin" and args.admin_command == "webhook-secret":
        from store.webhooks import secret_for

        print(secret_for(settings))
        return 0
    if args.command == "admin":
        return _admin(args, url)
    if args.command == "worker":
        cmd = worker_command(args.concurrency)
        os.execv(cmd[0], cmd)  # become the Celery worker: signals (SIGTERM from compose, tests) reach it directly
    return _serve(args, url)


def _admin(args: argparse.Namespace, url: str) -> int:
    from store import repo
    from store.db import session_scope
    from store.migrate import upgrade

    upgrade(url)
    with session_scope(url) as s:
        if args.admin_command == "create-team":
            team = repo.create_team(s, name=args.name)
            print(team.id)
            return 0
        found = repo.team_by_name_or_id(s, ref=args.team)
        if found is None:
            print(f"error [team_not_found]: no team {args.team!r}", file=sys.stderr)
            return 2
        print(repo.create_key(s, team=found))
        return 0


def _serve(args: argparse.Namespace, url: str) -> int:
    import uvicorn

    from store.migrate import upgrade

    upgrade(url)
    requeue_stranded(url)
    worker = None if args.api_only else subprocess.Popen(worker_command(), env=dict(os.environ),
                                                         preexec_fn=_die_with_parent)
    try:
        uvicorn.run("api.main:app", host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def _die_with_parent() -> None:
    """Linux: the embedded worker gets SIGTERM when `pflat serve` dies, however it dies (no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def requeue_stranded(url: str) -> None:
    """Re-send every queued job: a message lost with a broker is never lost work (claims are idempotent)."""
    from sqlalchemy import select

    from store.db import session_scope
    from store.models import JobRow
    from worker.client import enqueue

    with session_scope(url) as s:
        for job_id in s.scalars(select(JobRow.id).where(JobRow.status == "queued")):
            enqueue(job_id)


def _safe(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
