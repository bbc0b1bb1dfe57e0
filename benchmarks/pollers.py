"""Service benchmark (loopback only, bounded): submit → running latency, and GET /v1/fine_tuning/jobs/{id}
latency under 100 concurrent pollers, against `pflat serve` on embedded defaults (or on Postgres/Redis when
PFLAT_DATABASE_URL / PFLAT_BROKER_URL are set).

    python -m benchmarks.pollers [--pollers 100] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOY = "".join(f'{{"text": "{w} movie {i}", "label": "{lab}"}}\n'
              for i, (w, lab) in enumerate([("good", "great"), ("bad", "terrible")] * 50))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pollers", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-requests", type=int, default=400, help="per poller")
    ap.add_argument("--port", type=int, default=8799)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pflat-bench-"))
    env = {**os.environ, "PFLAT_DATA_DIR": str(tmp / "var"), "HF_HUB_OFFLINE": "1"}

    def cli(*a: str) -> str:
        return subprocess.run([sys.executable, "-m", "cli.main", *a], env=env, cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]

    cli("admin", "create-team", "bench")
    key = cli("admin", "create-key", "bench")
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(args.port)], env=env,
                              cwd=ROOT, stdout=(tmp / "serve.log").open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{args.port}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        c = httpx.Client(base_url=base, headers=headers, timeout=60)
        while True:
            try:
                if c.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        time.sleep(5)  # let the worker finish booting, so the first measurement is not its start-up
        f = c.post("/v1/files", files={"file": ("toy.jsonl", TOY.encode())}, data={"purpose": "fine-tune"}).json()
        body = {"model": "tiny-bert", "training_file": f["id"], "method": {"type": "dp_prefix", "dp_prefix": {
            "hyperparameters": {"target_epsilon": 5.0, "batch_size": 20, "n_epochs": 100, "max_steps": 300}}}}
        to_running = []
        for _ in range(3):
            t0 = time.perf_counter()
            job = c.post("/v1/fine_tuning/jobs", json=body).json()
            while c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] != "running":
                time.sleep(0.02)
            to_running.append(time.perf_counter() - t0)
            c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
            while c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["finished_at"] is None:
                time.sleep(0.05)
        target = c.post("/v1/fine_tuning/jobs", json=body).json()["id"]  # polled while it trains
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def poll() -> None:
            mine = []
            with httpx.Client(base_url=base, headers=headers, timeout=30) as pc:
                for _ in range(args.max_requests):
                    if time.perf_counter() > stop_at:
                        break
                    t = time.perf_counter()
                    ok = pc.get(f"/v1/fine_tuning/jobs/{target}").status_code == 200
                    mine.append(time.perf_counter() - t)
                    if not ok:
                        with lock:
                            errors[0] += 1
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=poll) for _ in range(args.pollers)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        c.post(f"/v1/fine_tuning/jobs/{target}/cancel")
        lat = sorted(latencies)
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        db = "postgres" if "postgres" in os.environ.get("PFLAT_DATABASE_URL", "") else "sqlite (embedded)"
        print("| database | submit → running (median of 3) | pollers | requests | req/s | p50 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {db} | {statistics.median(to_running):.2f}s | {args.pollers} | {len(lat)} | {len(lat) / wall:.0f} | "
              f"{p(0.5):.1f} | {p(0.99):.1f} | {errors[0]} |")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
