"""The official openai client drives the service unchanged."""

from __future__ import annotations

import io
import json

from openai import OpenAI

from tests.service.conftest import Service, wait_for

DATA = "".join(json.dumps({"text": f"{w} film {i}", "label": lab}) + "\n"
               for i, (w, lab) in enumerate([("good", "great"), ("bad", "terrible")] * 25))


def test_openai_client_round_trip(service: Service) -> None:
    key = service.new_key("openai-client")
    client = OpenAI(api_key=key, base_url=service.url + "/v1", max_retries=0)
    f = client.files.create(file=("toy.jsonl", io.BytesIO(DATA.encode())), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(DATA.encode())
    method = {"type": "dp_prefix", "dp_prefix": {"hyperparameters": {"target_epsilon": 4.0, "batch_size": 10,
                                                                     "max_steps": 3, "learning_rate": 0.05}}}
    job = client.fine_tuning.jobs.create(model="tiny-bert", training_file=f.id, method=method,  # type: ignore[arg-type]
                                         metadata={"purpose": "openai-test"}, seed=3)
    assert job.status == "queued" and job.training_file == f.id and job.seed == 3
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    with service.client(key) as http:
        done = wait_for(http, job.id)
    assert done["status"] == "succeeded", done["error"]
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(first.data) == 2 and first.has_more
    everything = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=2)]  # follows has_more
    assert everything[-1].startswith("Created fine-tuning job") and "successfully completed" in everything[0]
    assert any(j.id == job.id for j in client.fine_tuning.jobs.list(limit=50).data)
    result = client.fine_tuning.jobs.retrieve(job.id).result_files
    report = json.loads(client.files.content(result[1]).read())
    assert report["guarantee"] == "formal" and report["epsilon"] <= 4.0
    assert client.files.content(result[0]).read()[:2] == b"\x1f\x8b"  # a gzip archive
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert checkpoints.data[0].step_number == 3
    # Cancel one that is still queued or running.
    slow = client.fine_tuning.jobs.create(model="tiny-bert", training_file=f.id, method={  # type: ignore[arg-type]
        "type": "dp_prefix", "dp_prefix": {"hyperparameters": {"target_epsilon": 2.0, "batch_size": 10,
                                                               "n_epochs": 50, "max_steps": 250}}})
    assert client.fine_tuning.jobs.cancel(slow.id).status == "cancelled"
    assert client.files.retrieve(f.id).filename == "toy.jsonl"
