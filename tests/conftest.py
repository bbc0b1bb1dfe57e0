from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("PFLAT_DATASETS", ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets() -> Path:
    if not (DATASETS / "sst2" / "train.tsv").exists():
        if os.environ.get("CI"):  # CI lays shared/ beside the clone: missing data there is a failure, not a skip
            pytest.fail(f"shared datasets not found at {DATASETS}")
        pytest.skip(f"shared datasets not found at {DATASETS} (set PFLAT_DATASETS)")
    return DATASETS


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The converted SmolLM2 is reused across runs when PFLAT_CACHE_DIR is set (CI and the Makefile set it).
    env = os.environ.get("PFLAT_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("pflat-cache")
