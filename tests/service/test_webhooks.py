"""Signed webhooks on every state change, retried when the receiver fails."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from store.webhooks import sign, verify
from tests.service.conftest import Service, free_port, wait_for
from tests.service.test_api import TOY, job_body, upload


def test_signature_round_trip_and_tamper() -> None:
    body = b'{"a":1}'
    header = sign("s3cret", body, timestamp=int(time.time()))
    assert verify("s3cret", body, header)
    assert not verify("s3cret", body + b" ", header)
    assert not verify("other", body, header)
    assert not verify("s3cret", body, sign("s3cret", body, timestamp=int(time.time()) - 3600))


def test_job_state_changes_are_posted_signed_and_retried(service: Service) -> None:
    received: list[tuple[dict, str]] = []
    failures = {"left": 1}  # the first delivery gets a 500: it must be retried

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            if failures["left"]:
                failures["left"] -= 1
                self.send_response(500)
            else:
                received.append((json.loads(raw), self.headers["X-PFlat-Signature"], raw))  # type: ignore[arg-type]
                self.send_response(204)
            self.end_headers()

        def log_message(self, *_a: object) -> None:
            pass

    port = free_port()
    server = HTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = service.client(service.new_key("webhooks"))
        f = upload(c, TOY).json()
        job = c.post("/v1/fine_tuning/jobs", json={**job_body(f["id"]),
                                                   "webhook_url": f"http://127.0.0.1:{port}/hook"}).json()
        assert wait_for(c, job["id"])["status"] == "succeeded"
        deadline = time.time() + 40
        while len(received) < 3 and time.time() < deadline:
            time.sleep(0.2)
        secret = service.cli("admin", "webhook-secret")
        kinds = sorted(event["type"] for event, _sig, _raw in received)  # type: ignore[misc]
        assert kinds == sorted(["fine_tuning.job.queued", "fine_tuning.job.running", "fine_tuning.job.succeeded"])
        for event, sig, raw in received:  # type: ignore[misc]
            assert verify(secret, raw, sig)
            assert set(event["data"]) <= {"id", "status", "dataset", "error"}  # metadata only, never data
        bad = c.post("/v1/fine_tuning/jobs", json={**job_body(f["id"]), "webhook_url": "ftp://x"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "webhook_url"
    finally:
        server.shutdown()
