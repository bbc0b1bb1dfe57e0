"""``pflat``: command-line entry point. Reads the environment and arguments, calls the core, prints.

Errors from the core (bad data, bad settings) print as one clear message and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    return Path(os.environ.get("PFLAT_CACHE_DIR", Path.home() / ".cache" / "pflat"))


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="Fine-tune a prefix (or soft prompt) with DP-SGD on a dataset file.")
    p.add_argument("--data", required=True, type=Path, help="training file: JSONL, CSV or TSV")
    p.add_argument("--eval-data", type=Path, help="evaluation file (same format)")
    p.add_argument("--model", default="minilm", help="registry name (minilm, smollm2-135m) or a model folder")
    p.add_argument("--task", default="classification", choices=["classification", "generation"])
    p.add_argument("--method", default="dp_prefix", choices=["dp_prefix", "privacy_flat", "non_private"])
    p.add_argument("--tuning", default="prefix", choices=["prefix", "prompt"])
    p.add_argument("--trainer", default="first_order", choices=["first_order", "zeroth_order"],
                   help="zeroth_order: forward-only DP-ZO (two perturbed forward passes per step)")
    p.add_argument("--epsilon", type=float, default=3.0, help="target ε (dp methods)")
    p.add_argument("--delta", type=float, default=None, help="δ (default min(1e-5, 1/(10n)))")
    p.add_argument("--max-grad-norm", type=float, default=0.1, help="per-example clipping bound C")
    p.add_argument("--accountant", default="rdp", choices=["rdp", "pld"])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256, help="expected logical batch size")
    p.add_argument("--physical-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--num-virtual-tokens", type=int, default=10)
    p.add_argument("--label-names", default=None, help="comma-separated verbalizer words per label index")
    p.add_argument("--max-rows", type=int, default=None, help="use only the first N training rows")
    p.add_argument("--eval-max-examples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--out", required=True, type=Path, help="output folder for the adapter and the report")
    p.add_argument("--audit-fraction", type=float, default=0.0,
                   help="hold out this share of the training file for a membership-inference audit")
    f = p.add_argument_group("Privacy-Flat (--method privacy_flat)")
    f.add_argument("--guarantee", default="formal", choices=["formal", "empirical"],
                   help="formal: (ε, δ)-DP; empirical: the paper's recipe, no formal bound")
    f.add_argument("--public-data", type=Path, default=None,
                   help="data you declare public: the teacher and the layer probe in formal mode")
    f.add_argument("--no-awp", dest="awp", action="store_false", help="no adversarial weight perturbation")
    f.add_argument("--no-layer-selection", dest="layer_selection", action="store_false",
                   help="keep every prefix layer")
    f.add_argument("--no-distillation", dest="distillation", action="store_false", help="no teacher prefix")
    f.add_argument("--awp-gamma", type=float, default=None, help="AWP radius, relative per prefix layer")
    f.add_argument("--keep-layers", type=int, default=None, help="prefix layers to keep")
    f.add_argument("--distill-lambda", type=float, default=None, help="weight of ‖P − P_teacher‖")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.pipeline import run_job
    from core.spec import TrainSpec

    spec = TrainSpec(
        model=args.model, task=args.task, method=args.method, tuning=args.tuning,
        num_virtual_tokens=args.num_virtual_tokens, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, physical_batch_size=args.physical_batch_size, lr=args.lr,
        target_epsilon=args.epsilon if args.method != "non_private" else None, target_delta=args.delta,
        max_grad_norm=args.max_grad_norm, accountant=args.accountant, seed=args.seed,
        label_names=tuple(args.label_names.split(",")) if args.label_names else None,
        max_length=args.max_length, eval_max_examples=args.eval_max_examples, trainer=args.trainer,
        guarantee=args.guarantee, awp=args.awp, layer_selection=args.layer_selection,
        distillation=args.distillation, keep_layers=args.keep_layers, audit_fraction=args.audit_fraction,
        **{k: v for k, v in (("awp_gamma", args.awp_gamma), ("distill_lambda", args.distill_lambda))
           if v is not None},
    )
    bar: Any = None

    def progress(p: Any) -> None:
        nonlocal bar
        if args.quiet:
            return
        if p.stage == "prepared":
            bar = tqdm(total=p.total_steps, desc="train", unit="step", file=sys.stderr)
            print(f"σ={p.metrics['noise_multiplier']:.4g} q={p.metrics['sample_rate']:.4g} "
                  f"δ={p.metrics['delta']:.3g} steps={p.total_steps}", file=sys.stderr)
        elif p.stage == "train" and bar is not None:
            post = {"loss": f"{p.loss:.4f}"}
            if p.epsilon is not None:
                post["ε"] = f"{p.epsilon:.3f}"
            bar.set_postfix(post)
            bar.update(1)
        elif p.stage == "evaluate" and bar is not None:
            bar.close()
            print("evaluating ...", file=sys.stderr)

    report = run_job(spec, train_path=args.data, eval_path=args.eval_data, out_dir=args.out,
                     cache_dir=default_cache_dir(), device=args.device, callback=progress, max_rows=args.max_rows,
                     public_path=args.public_data)
    summary = {k: report[k] for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                                      "accountant", "guarantee", "guarantee_note")}
    summary["metrics"] = {k: v for k, v in report["metrics"].items() if k != "samples"}
    summary["zero_shot_metrics"] = report["zero_shot_metrics"]
    summary["train_seconds"] = round(report["timing"]["train_seconds"], 1)
    if report.get("privacy_flat"):
        pf = report["privacy_flat"]
        summary["privacy_flat"] = {"kept_layers": (pf.get("selection") or {}).get("kept"),
                                   "teacher": pf.get("teacher"), "awp": pf.get("awp_run")}
    if report.get("audit"):
        summary["mia_auc"] = report["audit"]["mia_auc"]
    if report.get("flatness"):
        summary["sharpness"] = report["flatness"]["sharpness_random"]
    summary["out"] = str(args.out)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pflat", description="Privacy-Flat: private prefix tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    from cli import service

    service.add_parsers(sub)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local; never reach for a hub
    from core.errors import CoreError

    try:
        if args.command == "train":
            return cmd_train(args)
        return service.run(args)
    except CoreError as err:
        print(f"error [{err.code}]{f' ({err.param})' if err.param else ''}: {err.message}", file=sys.stderr)
        if hasattr(err, "issues"):
            for issue in err.issues[:50]:
                print(f"  - {issue}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error [file_not_found]: {err.filename}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
