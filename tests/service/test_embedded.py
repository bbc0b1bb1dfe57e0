"""The embedded default: no Postgres, no Redis, no configuration: SQLite, a SQLite broker, local files, and
`pflat serve` starting the API and a worker together."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import Service, start, stop, wait_for
from tests.service.test_api import TOY, job_body, upload


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("embedded")
    env = {"PFLAT_DATA_DIR": str(tmp / "var"), "PFLAT_CACHE_DIR": str(cache_dir)}
    for key in ("PFLAT_DATABASE_URL", "PFLAT_BROKER_URL", "PFLAT_STORAGE_URL"):
        env[key] = ""  # empty means "not set": the embedded defaults
    svc = start(env, worker="embedded", tmp=tmp)
    yield svc
    stop(svc)


def test_embedded_end_to_end(embedded: Service, tmp_path: Path) -> None:
    assert (Path(embedded.env["PFLAT_DATA_DIR"]) / "pflat.db").exists()
    c = embedded.client(embedded.new_key("embedded"))
    f = upload(c, TOY).json()
    job = c.post("/v1/fine_tuning/jobs", json=job_body(f["id"], max_steps=3)).json()
    done = wait_for(c, job["id"])
    assert done["status"] == "succeeded", done["error"]
    with tarfile.open(fileobj=io.BytesIO(c.get(f"/v1/files/{done['result_files'][0]}/content").content)) as tar:
        tar.extractall(tmp_path, filter="data")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    ledger = c.get(f"/v1/datasets/{f['dataset']}/ledger").json()
    assert [e["kind"] for e in ledger["entries"]] == ["reserve", "spend", "spend", "spend"]
    assert 0 < ledger["epsilon_spent"] <= 4.0
    assert ledger["epsilon_max"] == 10.0  # the default budget
    assert c.put(f"/v1/datasets/{f['dataset']}", json={"epsilon_max": ledger["epsilon_spent"]}).status_code == 200
    refused = c.post("/v1/fine_tuning/jobs", json=job_body(f["id"], target_epsilon=0.5))
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "budget_exceeded"
