"""Signed webhooks: a POST with metadata only (never data) on every job state change, retried with back-off.

Signature header ``X-PFlat-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` (the Stripe
scheme: the timestamp inside the MAC stops replays). The secret is ``PFLAT_WEBHOOK_SECRET`` or, when unset, a
random one created once under the data directory (``pflat admin webhook-secret`` prints it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from store.settings import Settings

log = logging.getLogger("pflat.webhooks")
DELAYS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)  # six tries over ~31 s


def secret_for(settings: Settings) -> str:
    if settings.webhook_secret:
        return settings.webhook_secret
    path = settings.data_dir / "webhook_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        tmp.replace(path)
    return Path(path).read_text().strip()


def sign(secret: str, body: bytes, *, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance_s: int = 300) -> bool:
    """Check a signature header (what a receiver does)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    return abs(time.time() - ts) <= tolerance_s and hmac.compare_digest(sign(secret, body, timestamp=ts), header)


def payload(*, job_id: str, status: str, dataset_id: str, extra: dict[str, Any] | None = None) -> bytes:
    event = {"object": "event", "type": f"fine_tuning.job.{status}", "created_at": int(time.time()),
             "data": {"id": job_id, "status": status, "dataset": dataset_id, **(extra or {})}}
    return json.dumps(event, separators=(",", ":")).encode()


def deliver(url: str, body: bytes, secret: str) -> bool:
    """POST with retries and back-off; True once any 2xx arrives. Runs in a background thread."""
    for attempt, delay in enumerate(DELAYS, 1):
        time.sleep(delay)
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "pflat-webhooks/1",
            "X-PFlat-Signature": sign(secret, body, timestamp=int(time.time()))})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - http(s) only (schema check)
                if 200 <= resp.status < 300:
                    return True
        except Exception as err:  # noqa: BLE001 - any failure is retried, then logged
            log.info("webhook %s attempt %d failed: %s", url, attempt, err)
    log.warning("webhook %s gave up after %d attempts", url, len(DELAYS))
    return False


def notify(settings: Settings, *, url: str | None, job_id: str, status: str, dataset_id: str,
           extra: dict[str, Any] | None = None) -> threading.Thread | None:
    """Send the state change in the background (never blocks the caller, never raises)."""
    if not url:
        return None
    body = payload(job_id=job_id, status=status, dataset_id=dataset_id, extra=extra)
    thread = threading.Thread(target=deliver, args=(url, body, secret_for(settings)), daemon=True,
                              name=f"webhook-{job_id}-{status}")
    thread.start()
    return thread
