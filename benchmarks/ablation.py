"""Privacy-Flat ablation on real data: which part of the method buys what, at what privacy and time cost.

SST-2 with `minilm` (ε = 3 and 8; seeds 0-2 for the headline rows DP prefix and Privacy-Flat formal, seed 0
for the others) and E2E with `smollm2-135m` at a smaller size. Every run goes through the product path
(``core.pipeline.run_job``): it holds out an audit split, trains, evaluates on the dev set, measures
flatness and runs a loss-threshold membership-inference audit. Runs of one seed share ``noise_seed``, so
configurations are compared on the same Poisson batches and noise draws (paired).

Data (from ../shared/datasets, shuffled with a fixed seed, disjoint): a *public* slice of the training file
(the formal-mode teacher and layer probe), a *private* slice (members; 10% of it is held out as audit
non-members), and the official dev set for accuracy.

    python -m benchmarks.ablation [--datasets DIR] [--part sst2|e2e|all] [--quick] [--work DIR] [--out DIR]

Finished runs are cached in ``--work`` (a rerun resumes); the tables and plots go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from core.data import Dataset, load_dataset, write_jsonl
from core.spec import TrainSpec

# name -> TrainSpec overrides. "formal" rows get the public file.
CONFIGS: dict[str, dict[str, Any]] = {
    "non-private prefix": {"method": "non_private"},
    "DP prefix": {"method": "dp_prefix"},
    "+AWP": {"method": "privacy_flat", "layer_selection": False, "distillation": False},
    "+layer selection": {"method": "privacy_flat", "awp": False, "distillation": False},
    "+distillation": {"method": "privacy_flat", "awp": False, "layer_selection": False},
    "Privacy-Flat formal": {"method": "privacy_flat"},
    "Privacy-Flat empirical": {"method": "privacy_flat", "guarantee": "empirical"},
    "black-box DP prompt": {"method": "dp_prefix", "tuning": "prompt"},
    "black-box Privacy-Flat": {"method": "privacy_flat", "tuning": "prompt"},
    # Forward-only: SGD (Adam's per-coordinate normalisation turns a one-direction estimate into a random
    # walk) and C = 1 (a directional derivative along z with ‖z‖ ≈ √dim is far larger than a gradient norm).
    "black-box DP-ZO prompt": {"method": "dp_prefix", "tuning": "prompt", "trainer": "zeroth_order",
                               "optimizer": "sgd", "lr": 0.002, "max_grad_norm": 1.0},
}
HEADLINE = ("DP prefix", "Privacy-Flat formal")


def split_files(datasets: Path, work: Path, *, part: str, quick: bool) -> dict[str, Path]:
    """Write the public / private / dev files of one part (once; reused by every run)."""
    rng = random.Random(1234)
    if part == "sst2":
        full = load_dataset(datasets / "sst2" / "train.tsv", task="classification")
        ex = list(full.examples)
        rng.shuffle(ex)
        n_pub, n_priv = (300, 600) if quick else (1000, 4000)
        sets = {"public": ex[:n_pub], "private": ex[n_pub:n_pub + n_priv]}
        dev = load_dataset(datasets / "sst2" / "dev.tsv", task="classification", label_names=full.label_names)
        sets["dev"] = list(dev.examples)[: 200 if quick else None]
        names = full.label_names
        task = "classification"
    else:
        full = load_dataset(datasets / "e2e" / "devset.csv", task="generation")
        by_mr: dict[str, list[Any]] = {}
        for e in full.examples:
            by_mr.setdefault(e.text, []).append(e)
        mrs = sorted(by_mr)
        rng.shuffle(mrs)
        pub_mr, priv_mr = (mrs[:10], mrs[10:40]) if quick else (mrs[:30], mrs[30:130])
        sets = {"public": [e for m in pub_mr for e in by_mr[m]][:80 if quick else 150],
                "private": [e for m in priv_mr for e in by_mr[m]][:120 if quick else 240]}
        test = load_dataset(datasets / "e2e" / "testset_w_refs.csv", task="generation")
        t_by: dict[str, list[Any]] = {}
        for e in test.examples:
            t_by.setdefault(e.text, []).append(e)
        sets["dev"] = [e for m in sorted(t_by)[: 8 if quick else 30] for e in t_by[m]]
        names, task = None, "generation"
    work.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, rows in sets.items():
        paths[key] = work / f"{part}_{key}.jsonl"
        write_jsonl(Dataset(task, tuple(rows), names), paths[key])
    return paths


def base_spec(part: str, *, quick: bool) -> dict[str, Any]:
    if part == "sst2":
        return {"model": "minilm", "task": "classification", "label_names": ("terrible", "great"),
                "batch_size": 256 if quick else 500,
                "epochs": 2.0, "lr": 0.1, "max_grad_norm": 0.1, "physical_batch_size": 64,
                "audit_fraction": 0.1, "flatness_probe": 64}
    return {"model": "smollm2-135m", "task": "generation", "batch_size": 60, "epochs": 2.0,
            "lr": 0.05, "max_grad_norm": 0.1, "physical_batch_size": 16, "audit_fraction": 0.1,
            # 30 layers: the indicator costs 31 x (1 + directions) probe passes, so a small probe here.
            "flatness_probe": 16, "selection_probe": 8, "selection_directions": 1, "max_new_tokens": 32,
            "eval_max_examples": 40 if not quick else 16, "max_length": 96}


def plan(part: str, *, quick: bool) -> list[tuple[str, float | None, int]]:
    """(config, ε, seed) runs of one part, headline rows first."""
    if part == "e2e":
        return [("DP prefix", 8.0, 0), ("Privacy-Flat formal", 8.0, 0), ("non-private prefix", None, 0)]
    seeds = (0,) if quick else (0, 1, 2)
    runs: list[tuple[str, float | None, int]] = []
    for eps in (3.0, 8.0):
        runs += [(name, eps, s) for s in seeds for name in HEADLINE]
    runs.append(("non-private prefix", None, 0))
    for eps in (3.0, 8.0):
        runs += [(name, eps, 0) for name in CONFIGS if name not in HEADLINE and name != "non-private prefix"]
    return runs


def run_one(part: str, name: str, eps: float | None, seed: int, files: dict[str, Path], *, work: Path,
            cache_dir: Path, quick: bool) -> dict[str, Any]:
    from core.pipeline import run_job

    fields = base_spec(part, quick=quick) | CONFIGS[name]
    fields.update(seed=seed, noise_seed=1000 + seed, target_epsilon=eps if fields["method"] != "non_private" else None)
    spec = TrainSpec(**fields)
    public = files["public"] if spec.needs_public_data else None
    out = work / "runs" / f"{part}-{name.replace(' ', '_')}-{eps}-{seed}"
    t0 = time.perf_counter()
    rep = run_job(spec, train_path=files["private"], eval_path=files["dev"], out_dir=out, cache_dir=cache_dir,
                  device="cpu", public_path=public)
    m = rep["metrics"]
    return {"part": part, "config": name, "epsilon_target": eps, "seed": seed, "epsilon": rep["epsilon"],
            "mechanism_epsilon": rep["mechanism_epsilon"], "guarantee": rep["guarantee"],
            "accuracy": m.get("accuracy"), "bleu": m.get("bleu"), "rouge_l": m.get("rouge_l"),
            "sharpness": (rep["flatness"] or {}).get("sharpness_random"),
            "sharpness_gradient": (rep["flatness"] or {}).get("sharpness_gradient"),
            "curve": (rep["flatness"] or {}).get("curves", {}).get("random"),
            "mia_auc": (rep["audit"] or {}).get("mia_auc"), "seconds": time.perf_counter() - t0,
            "train_seconds": rep["timing"]["train_seconds"], "steps": rep["steps"],
            "kept_layers": ((rep["privacy_flat"] or {}).get("selection") or {}).get("kept")}


def _ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(results: list[dict[str, Any]], part: str) -> str:
    rows = [r for r in results if r["part"] == part]
    metric = ("accuracy", "dev acc (%)", 100.0) if part == "sst2" else ("bleu", "BLEU", 1.0)
    head = f"| config | ε | seeds | {metric[1]} | " + ("ROUGE-L | " if part == "e2e" else "") + \
        "sharpness (ρ=0.05) | MIA AUC | wall / DP prefix |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = list(CONFIGS)
    for eps in sorted({r["epsilon_target"] for r in rows}, key=lambda e: (e is not None, e or 0)):
        dp_eps = sorted(r["epsilon_target"] for r in rows if r["config"] == "DP prefix")
        ref_eps = eps if eps in dp_eps else (dp_eps[0] if dp_eps else None)  # non-private: the smallest ε's
        ref = [r["seconds"] for r in rows if r["config"] == "DP prefix" and r["epsilon_target"] == ref_eps]
        for name in order:
            group = [r for r in rows if r["config"] == name and r["epsilon_target"] == eps]
            if not group:
                continue
            wall = statistics.mean(r["seconds"] for r in group) / statistics.mean(ref) if ref else float("nan")
            cells = [name + (" (no formal bound)" if group[0]["guarantee"] != "formal" else ""),
                     "∞" if eps is None else f"{eps:g}", str(len(group)),
                     _ms([r[metric[0]] for r in group], metric[2], 2 if part == "e2e" else 1)]
            if part == "e2e":
                cells.append(_ms([r["rouge_l"] for r in group], 1.0, 2))
            cells += [_ms([r["sharpness"] for r in group], 1.0, 4), _ms([r["mia_auc"] for r in group], 1.0, 3),
                      f"{wall:.2f}×"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: list[dict[str, Any]], part: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    eps = 3.0 if part == "sst2" else 8.0
    for r in results:
        if r["part"] == part and r["seed"] == 0 and r["curve"] and r["epsilon_target"] in (eps, None):
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", ms=3, label=f"{r['config']} (ε={r['epsilon_target'] or '∞'})")
    ax.set_xlabel("α (random direction, step α·0.05·‖w‖ per tensor)")
    ax.set_ylabel("dev loss")
    ax.set_title(f"{part}: loss landscape around the tuned prefix (seed 0)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", type=Path, default=Path(os.environ.get("PFLAT_DATASETS", "../shared/datasets")))
    ap.add_argument("--part", default="all", choices=["sst2", "e2e", "all"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmark runs, nothing more")
    ap.add_argument("--work", type=Path, default=Path("var/ablation"))
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("PFLAT_CACHE_DIR",
                                                                          Path.home() / ".cache" / "pflat")))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work / ("quick" if args.quick else "full")
    store = work / "results.jsonl"
    done = [json.loads(line) for line in store.read_text().splitlines()] if store.exists() else []
    key = lambda r: (r["part"], r["config"], r["epsilon_target"], r["seed"])  # noqa: E731
    have = {key(r) for r in done}
    parts = ["sst2", "e2e"] if args.part == "all" else [args.part]
    start = time.perf_counter()
    for part in parts:
        files = split_files(args.datasets, work, part=part, quick=args.quick)
        for name, eps, seed in plan(part, quick=args.quick):
            if (part, name, eps, seed) in have:
                continue
            r = run_one(part, name, eps, seed, files, work=work, cache_dir=args.cache_dir, quick=args.quick)
            done.append(r)
            with store.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
            print(f"[{time.perf_counter() - start:7.0f}s] {part} {name} ε={eps} seed={seed}: "
                  f"acc={r['accuracy']} bleu={r['bleu']} sharp={r['sharpness']} auc={r['mia_auc']} "
                  f"{r['seconds']:.0f}s", flush=True)
    out = args.out if not args.quick else work
    out.mkdir(parents=True, exist_ok=True)
    text = []
    for part in parts:
        t = table(done, part)
        print(f"\n## {part}\n\n{t}\n")
        text.append(f"## {part}\n\n{t}\n")
        plot_curves(done, part, out / f"ablation_{part}_landscape.png")
    (out / "ablation.md").write_text("\n".join(text))
    (out / "ablation_runs.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "curve"}
                                                       for r in done], indent=1))


if __name__ == "__main__":
    main()
