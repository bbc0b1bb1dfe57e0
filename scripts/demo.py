"""`make demo`: the whole product on embedded defaults, through the REST API.

Starts `pflat serve` (SQLite, SQLite broker, local artifacts, one worker), makes a team and key, uploads a
2,000-row SST-2 sample and the dev set, asks for an estimate, submits a DP job, follows its events, downloads
the adapter archive and the privacy report, prints the report and stops the server.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, default=Path(os.environ.get("PFLAT_DATASETS", ROOT.parent / "shared" /
                                                                         "datasets")))
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PFLAT_DATA_DIR": str(args.out / "var"), "HF_HUB_OFFLINE": "1"}
    for key in ("PFLAT_DATABASE_URL", "PFLAT_BROKER_URL", "PFLAT_STORAGE_URL"):
        env.pop(key, None)

    def cli(*a: str) -> str:
        return subprocess.run([sys.executable, "-m", "cli.main", *a], env=env, cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]

    subprocess.run([sys.executable, "-m", "cli.main", "admin", "create-team", "demo"], env=env, cwd=ROOT,
                   capture_output=True)
    key = cli("admin", "create-key", "demo")
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(args.port)], env=env, cwd=ROOT,
                              stdout=(args.out / "serve.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    try:
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        for _ in range(240):
            try:
                if c.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        lines = (args.datasets / "sst2" / "train.tsv").read_text().splitlines(keepends=True)[: args.rows + 1]
        train = c.post("/v1/files", files={"file": ("sst2-sample.tsv", "".join(lines).encode())},
                       data={"purpose": "fine-tune", "label_names": "terrible,great"}).json()
        print(f"uploaded {train['rows']} rows as {train['id']} into dataset {train['dataset']}")
        dev = c.post("/v1/files", files={"file": ("sst2-dev.tsv", (args.datasets / "sst2" / "dev.tsv").read_bytes())},
                     data={"purpose": "fine-tune", "label_names": "terrible,great"}).json()
        body = {"model": "minilm", "training_file": train["id"], "validation_file": dev["id"], "seed": 0,
                "method": {"type": "dp_prefix", "dp_prefix": {"hyperparameters": {
                    "target_epsilon": 8.0, "n_epochs": 3, "batch_size": 256, "learning_rate": 0.05}}}}
        est = c.post("/v1/fine_tuning/jobs/estimate", json=body).json()
        print(f"estimate: σ={est['noise_multiplier']:.3f} q={est['sample_rate']:.3f} steps={est['steps']} "
              f"ε={est['epsilon']:.3f}; dataset ε after: {est['ledger_after']['epsilon_reserved']:.3f} "
              f"of {est['ledger_after']['epsilon_max']}")
        t0 = time.time()
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        print(f"job {job['id']}: {job['status']}")
        seen: set[str] = set()
        while True:
            job = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            events = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
            for e in reversed(events):
                if e["id"] not in seen:
                    seen.add(e["id"])
                    d = e.get("data") or {}
                    extra = (f" loss={d['train_loss']:.4f} ε={d['epsilon_spent']:.3f}"
                             if d.get("train_loss") is not None and d.get("epsilon_spent") is not None else "")
                    print(f"  [{time.time() - t0:6.1f}s] {e['message']}{extra}", flush=True)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        if job["status"] != "succeeded":
            print(f"job ended {job['status']}: {job['error']}")
            return 1
        archive = c.get(f"/v1/files/{job['result_files'][0]}/content").content
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(args.out, filter="data")
        report = c.get(f"/v1/fine_tuning/jobs/{job['id']}/report").json()
        (args.out / "privacy_report.json").write_text(json.dumps(report, indent=2))
        keep = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant", "max_grad_norm",
                "guarantee", "guarantee_note", "metrics", "zero_shot_metrics")
        print(json.dumps({k: report[k] for k in keep}, indent=2))
        print(f"end to end: {time.time() - t0:.1f}s; adapter in {args.out / 'adapter'} "
              "(PeftModel.from_pretrained loads it); report in privacy_report.json")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
