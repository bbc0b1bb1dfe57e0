"""Live service fixtures: a fresh Postgres database, a private Redis db, a real Celery worker and the API,
each a real process talking over loopback."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("PFLAT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("PFLAT_TEST_REDIS", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    url: str
    env: dict[str, str]
    procs: list[subprocess.Popen]

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "cli.main", *args], env=self.env, cwd=ROOT, check=True,
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1]

    def new_key(self, team: str) -> str:
        try:
            self.cli("admin", "create-team", team)
        except subprocess.CalledProcessError:
            pass  # exists
        return self.cli("admin", "create-key", team)

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def start(env: dict[str, str], *, worker: bool | str, tmp: Path) -> Service:
    port = free_port()
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    log = (tmp / f"api-{port}.log").open("w")
    procs.append(subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port),
                                   *([] if worker == "embedded" else ["--api-only"])],
                                  cwd=ROOT, env=full, stdout=log, stderr=subprocess.STDOUT))
    if worker is True:
        wlog = (tmp / f"worker-{port}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], cwd=ROOT, env=full,
                                      stdout=wlog, stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return Service(url, full, procs)
        except httpx.HTTPError:
            time.sleep(0.3)
    for p in procs:
        p.kill()
    raise RuntimeError(f"API did not start; see {log.name}: {Path(log.name).read_text()[-3000:]}")


def stop(service: Service) -> None:
    for p in service.procs:
        p.terminate()
    for p in service.procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"pflat_test_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as err:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN}: {err}")
    yield PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    db = 5 + secrets.randbelow(10)
    url = f"{REDIS}/{db}"
    try:
        redis.Redis.from_url(url).flushdb()
    except redis.RedisError as err:
        pytest.fail(f"Redis is not reachable at {url}: {err}")
    return url


@pytest.fixture(scope="session")
def service(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
            cache_dir: Path) -> Iterator[Service]:
    """Production shape: Postgres + Redis + a separate Celery worker process + the API."""
    tmp = tmp_path_factory.mktemp("svc")
    env = {"PFLAT_DATABASE_URL": pg_url, "PFLAT_BROKER_URL": redis_url, "PFLAT_STORAGE_URL": str(tmp / "artifacts"),
           "PFLAT_DATA_DIR": str(tmp / "var"), "PFLAT_CACHE_DIR": str(cache_dir), "PFLAT_DEVICE": "cpu",
           "PFLAT_MAX_UPLOAD_BYTES": str(400_000)}
    svc = start(env, worker=True, tmp=tmp)
    yield svc
    stop(svc)


def wait_for(client: httpx.Client, job_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")
