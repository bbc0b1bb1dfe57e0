"""The one-way import rule: the API never loads torch; the core never loads web, DB or Celery."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "opacus")


def _loaded(module: str, names: tuple[str, ...]) -> list[str]:
    code = f"import sys, {module}; print(sorted(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120)
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own subprocess' list literal


def test_api_loads_no_torch() -> None:
    assert _loaded("api.main", HEAVY) == []


def test_core_loads_no_service_packages() -> None:
    assert _loaded("core.pipeline", ("fastapi", "sqlalchemy", "celery", "redis", "store", "api", "worker")) == []


def test_core_never_reads_the_environment() -> None:
    for path in (ROOT / "core").glob("*.py"):
        text = path.read_text()
        assert "os.environ" not in text and "getenv" not in text, path
