"""The REST service end to end on real Postgres, Redis and a real Celery worker process."""

from __future__ import annotations

import io
import math
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from core import accounting
from core.planning import calibrate
from core.spec import TrainSpec
from tests.service.conftest import Service, wait_for

TOY = "".join(f'{{"text": "{w} movie number {i}", "label": "{lab}"}}\n'
              for i, (w, lab) in enumerate([("good", "great"), ("bad", "terrible")] * 30))


def upload(client: httpx.Client, content: bytes | str, name: str = "toy.jsonl", **form: str) -> httpx.Response:
    data = content.encode() if isinstance(content, str) else content
    return client.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune", **form})


def job_body(file_id: str, model: str = "tiny-bert", **hyper: object) -> dict:
    h = {"target_epsilon": 4.0, "batch_size": 20, "max_steps": 2, "learning_rate": 0.05, **hyper}
    return {"model": model, "training_file": file_id, "method": {"type": "dp_prefix", "dp_prefix":
                                                                 {"hyperparameters": h}}}


def test_full_path_sst2_sample_to_loadable_adapter(service: Service, datasets: Path, tmp_path: Path) -> None:
    c = service.client(service.new_key("full-path"))
    sample = "".join((datasets / "sst2" / "train.tsv").read_text().splitlines(keepends=True)[:161])
    f = upload(c, sample, "sst2.tsv", label_names="terrible,great")
    assert f.status_code == 200, f.text
    assert f.json()["rows"] == 160 and f.json()["task"] == "classification"
    t0 = time.time()
    job = c.post("/v1/fine_tuning/jobs", json=job_body(f.json()["id"], model="minilm", batch_size=40)).json()
    assert job["status"] == "queued" and job["privacy"]["noise_multiplier"] > 0
    wait_for(c, job["id"], ("running", "succeeded"))
    print(f"submit → running: {time.time() - t0:.2f}s")
    job = wait_for(c, job["id"])
    assert job["status"] == "succeeded", job["error"]
    archive, report_id = job["result_files"]
    data = c.get(f"/v1/files/{archive}/content")
    assert data.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(data.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    from peft import PeftModel

    from core.models import load_base_model
    base = load_base_model("minilm", cache_dir=tmp_path)
    model = PeftModel.from_pretrained(base.model, str(tmp_path / "adapter"))
    assert model.peft_config["default"].num_virtual_tokens == 10
    report = c.get(f"/v1/fine_tuning/jobs/{job['id']}/report").json()
    assert report["guarantee"] == "formal" and report["epsilon"] <= 4.0 and report["steps"] == 2
    assert c.get(f"/v1/files/{report_id}/content").json()["epsilon"] == report["epsilon"]
    ckpts = c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert ckpts and ckpts[0]["step_number"] == 2
    ledger = c.get(f"/v1/datasets/{job['dataset']}/ledger").json()
    assert sum(e["steps"] for e in ledger["entries"] if e["kind"] == "spend") == 2
    assert math.isclose(ledger["epsilon_spent"], report["epsilon"], rel_tol=1e-6)


def test_concurrent_submissions_never_overspend(service: Service) -> None:
    c = service.client(service.new_key("concurrency"))
    f = upload(c, TOY).json()
    body = job_body(f["id"], target_epsilon=1.0, max_steps=1)
    spec = TrainSpec(model="tiny-bert", target_epsilon=1.0, batch_size=20, max_steps=1, lr=0.05,
                     label_names=("great", "terrible"), target_delta=1e-5)
    event = calibrate(spec, n=60).event()
    fits = max(k for k in range(1, 21) if accounting.epsilon([event] * k, delta=1e-5) <= 3.0)
    assert 1 < fits < 20  # the budget admits some, not all
    c.put(f"/v1/datasets/{f['dataset']}", json={"epsilon_max": 3.0})

    def submit(_i: int) -> int:
        with service.client(c.headers["Authorization"].split()[1]) as cc:
            return cc.post("/v1/fine_tuning/jobs", json=body).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(submit, range(20)))
    assert codes.count(200) == fits and codes.count(409) == 20 - fits, codes
    ledger = c.get(f"/v1/datasets/{f['dataset']}/ledger").json()
    assert ledger["epsilon_reserved"] <= 3.0 + 1e-9
    refused = c.post("/v1/fine_tuning/jobs", json=body)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "budget_exceeded"
    assert refused.json()["error"]["ledger"]["epsilon_max"] == 3.0


def test_cancel_running_job_pays_for_steps_taken(service: Service) -> None:
    c = service.client(service.new_key("cancel"))
    f = upload(c, TOY).json()
    job = c.post("/v1/fine_tuning/jobs", json=job_body(f["id"], max_steps=400, batch_size=30, n_epochs=200)).json()
    deadline = time.time() + 120
    while time.time() < deadline and c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["privacy"]["steps_done"] < 2:
        time.sleep(0.2)
    assert c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    deadline = time.time() + 60  # the worker notices within a step, then writes its final entries
    while (done := c.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["finished_at"] is None:
        assert time.time() < deadline, "the worker never acknowledged the cancellation"
        time.sleep(0.2)
    assert done["status"] == "cancelled" and 2 <= done["privacy"]["steps_done"] < 400
    entries = c.get(f"/v1/datasets/{f['dataset']}/ledger").json()["entries"]
    mine = [e for e in entries if e["job_id"] == job["id"]]
    spent = sum(e["steps"] for e in mine if e["kind"] == "spend")
    released = sum(e["steps"] for e in mine if e["kind"] == "release")
    assert spent == done["privacy"]["steps_done"] and spent + released == 400


def test_teams_cannot_see_each_other(service: Service) -> None:
    a, b = service.client(service.new_key("team-a")), service.client(service.new_key("team-b"))
    f = upload(a, TOY).json()
    job = a.post("/v1/fine_tuning/jobs", json=job_body(f["id"])).json()
    for path in (f"/v1/files/{f['id']}", f"/v1/files/{f['id']}/content", f"/v1/datasets/{f['dataset']}",
                 f"/v1/datasets/{f['dataset']}/ledger", f"/v1/fine_tuning/jobs/{job['id']}",
                 f"/v1/fine_tuning/jobs/{job['id']}/events", f"/v1/fine_tuning/jobs/{job['id']}/report"):
        r = b.get(path)
        assert r.status_code == 404, (path, r.status_code)
    assert b.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 404
    assert b.delete(f"/v1/files/{f['id']}").status_code == 404
    assert b.put(f"/v1/datasets/{f['dataset']}", json={"epsilon_max": 100}).status_code == 404
    assert b.post("/v1/fine_tuning/jobs", json=job_body(f["id"])).status_code == 404
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/datasets"):
        assert all(item["id"] not in (f["id"], job["id"], f["dataset"]) for item in b.get(path).json()["data"])
    assert httpx.get(service.url + "/v1/files").status_code == 401
    assert httpx.get(service.url + "/v1/files", headers={"Authorization": "Bearer nope"}).status_code == 401


def flat_body(file_id: str, public: str | None, **hyper: object) -> dict:
    h = {"target_epsilon": 4.0, "batch_size": 20, "max_steps": 2, "learning_rate": 0.05, "keep_layers": 1,
         "selection_probe": 8, **hyper}
    return {"model": "tiny-bert", "training_file": file_id, "public_file": public,
            "method": {"type": "privacy_flat", "privacy_flat": {"hyperparameters": h}}}


def test_privacy_flat_formal_and_empirical_jobs(service: Service) -> None:
    c = service.client(service.new_key("privacy-flat"))
    private = upload(c, TOY).json()
    public = upload(c, TOY.replace("movie", "film")).json()  # its own dataset, declared public
    assert public["dataset"] != private["dataset"]
    job = c.post("/v1/fine_tuning/jobs", json=flat_body(private["id"], public["id"])).json()
    assert job["method"]["type"] == "privacy_flat" and job["public_file"] == public["id"]
    job = wait_for(c, job["id"])
    assert job["status"] == "succeeded", job["error"]
    report = c.get(f"/v1/fine_tuning/jobs/{job['id']}/report").json()
    assert report["guarantee"] == "formal" and 0 < report["epsilon"] <= 4.0
    assert report["privacy_flat"]["teacher"]["source"] == "public"
    assert report["privacy_flat"]["selection"]["kept"] and report["privacy_flat"]["awp_run"]["gamma"] > 0
    assert c.get(f"/v1/datasets/{private['dataset']}/ledger").json()["formal_guarantee"] is True
    assert c.get(f"/v1/datasets/{public['dataset']}/ledger").json()["entries"] == []  # public data costs nothing

    emp = c.post("/v1/fine_tuning/jobs", json=flat_body(private["id"], None, guarantee="empirical")).json()
    assert emp["privacy"]["guarantee"] == "empirical"
    emp = wait_for(c, emp["id"])
    assert emp["status"] == "succeeded", emp["error"]
    report = c.get(f"/v1/fine_tuning/jobs/{emp['id']}/report").json()
    assert report["epsilon"] is None and report["mechanism_epsilon"] > 0
    assert report["guarantee_note"].startswith("No formal")
    ledger = c.get(f"/v1/datasets/{private['dataset']}/ledger").json()
    assert ledger["formal_guarantee"] is False  # the dataset says so from now on


@pytest.mark.parametrize("case", ["no_public", "public_is_private", "public_missing", "empirical_dp_prefix",
                                  "formal_awp_steps"])
def test_bad_privacy_flat_requests(service: Service, case: str) -> None:
    c = service.client(service.new_key("bad-flat"))
    f = upload(c, TOY).json()
    body, code, param = flat_body(f["id"], None), "public_file_required", "public_file"
    if case == "public_is_private":
        same = upload(c, TOY, dataset=f["dataset"]).json()
        body, code = flat_body(f["id"], same["id"]), "public_file_is_private"
    elif case == "public_missing":
        body, code = flat_body(f["id"], "file-nope"), "file_not_found"
    elif case == "empirical_dp_prefix":
        body = job_body(f["id"], guarantee="empirical")
        code, param = "guarantee_not_available", "method.dp_prefix.hyperparameters.guarantee"
    elif case == "formal_awp_steps":
        body = flat_body(f["id"], None, distillation=False, layer_selection=False, awp_steps=3)
        code, param = "invalid_spec", "method.privacy_flat.hyperparameters.awp_steps"
    r = c.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code in (404, 422), r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    assert c.get(f"/v1/datasets/{f['dataset']}/ledger").json()["entries"] == []


@pytest.mark.parametrize("case", ["malformed_json", "wrong_type", "zero_eps", "negative_eps", "big_delta",
                                  "unknown_model", "missing_file", "unknown_field", "bad_method"])
def test_bad_job_requests_get_4xx_with_code_and_param(service: Service, case: str) -> None:
    c = service.client(service.new_key("bad-input"))
    f = upload(c, TOY).json()
    body = job_body(f["id"])
    hyper = body["method"]["dp_prefix"]["hyperparameters"]
    expect_param = None
    if case == "malformed_json":
        r = c.post("/v1/fine_tuning/jobs", content=b'{"model": ', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        return
    if case == "wrong_type":
        hyper["batch_size"], expect_param = "lots", "method.dp_prefix.hyperparameters.batch_size"
    elif case in ("zero_eps", "negative_eps"):
        hyper["target_epsilon"] = 0 if case == "zero_eps" else -1
        expect_param = "method.dp_prefix.hyperparameters.target_epsilon"
    elif case == "big_delta":
        c.put(f"/v1/datasets/{f['dataset']}", json={"delta": 0.5})
        hyper["target_delta"], expect_param = 0.05, "method.dp_prefix.hyperparameters.target_delta"
    elif case == "unknown_model":
        body["model"], expect_param = "gpt-17", "model"
    elif case == "missing_file":
        body["training_file"], expect_param = "file-doesnotexist", "training_file"
    elif case == "unknown_field":
        hyper["epsilonn"], expect_param = 3, "method.dp_prefix.hyperparameters.epsilonn"
    elif case == "bad_method":
        body["method"]["type"], expect_param = "magic", "method.type"
    r = c.post("/v1/fine_tuning/jobs", json=body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["code"] and err["message"] and err["param"] == expect_param, err
    assert c.post("/v1/fine_tuning/jobs/estimate", json=body).status_code == r.status_code


def test_bad_uploads_get_4xx_and_store_nothing(service: Service) -> None:
    c = service.client(service.new_key("bad-upload"))
    before = len(c.get("/v1/files").json()["data"])
    big = upload(c, '{"text": "x", "label": 0}\n' * 20000)
    assert big.status_code == 413 and big.json()["error"]["param"] == "file"
    fmt = upload(c, "hello", "notes.docx")
    assert fmt.status_code == 400 and fmt.json()["error"]["code"] == "unsupported_file_format"
    bad = upload(c, '{"text": "a", "label": 0}\n{"text": 5, "label": 1}\n{"label": 1}\nnot json\n')
    err = bad.json()["error"]
    assert bad.status_code == 400 and err["code"] == "invalid_dataset"
    assert {i["line"] for i in err["issues"]} >= {2, 3, 4}
    assert upload(c, TOY, purpose_override="x").status_code == 200  # extra form fields are ignored
    r = c.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "assistants"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "purpose"
    assert c.post("/v1/files", data={"purpose": "fine-tune"}).status_code == 422
    assert len(c.get("/v1/files").json()["data"]) == before + 1


def test_estimate_reserves_nothing_and_listing_paginates(service: Service) -> None:
    c = service.client(service.new_key("estimate"))
    f = upload(c, TOY).json()
    est = c.post("/v1/fine_tuning/jobs/estimate", json=job_body(f["id"])).json()
    assert est["fits_budget"] and 0 < est["epsilon"] <= 4.0 and est["ledger_before"]["epsilon_reserved"] == 0
    assert c.get(f"/v1/datasets/{f['dataset']}/ledger").json()["entries"] == []
    ids = [c.post("/v1/fine_tuning/jobs", json={**job_body(f["id"], target_epsilon=1.0),
                                                "metadata": {"run": str(i)}}).json()["id"] for i in range(3)]
    page1 = c.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert page1["has_more"] and len(page1["data"]) == 2
    page2 = c.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": page1["last_id"]}).json()
    assert {j["id"] for j in page1["data"] + page2["data"]} == set(ids)
    only = c.get("/v1/fine_tuning/jobs", params={"metadata[run]": "1"}).json()["data"]
    assert [j["id"] for j in only] == [ids[1]]
    assert c.get("/v1/models").json()["data"][0]["object"] == "model"
