"""The job orchestrator: one function per stage, called in order. No stage touches a database or the
environment; progress and cancellation cross the boundary through one callback."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.audit import membership_audit
from core.batching import Encoded, Template, encode_classification, encode_generation
from core.data import Dataset, load_dataset, split_holdout
from core.evaluate import classification_metrics, generation_metrics
from core.export import save_adapter, versions, write_report
from core.flatness import measure, plot
from core.heads import Head, build_head
from core.models import BaseModel, load_base_model
from core.objective import probe_loss
from core.planning import Mechanism, calibrate
from core.privacy_flat import FlatSetup, setup
from core.prompting import PromptLearner, build_learner
from core.spec import TrainSpec, check_public_data
from core.train import Progress, ProgressFn, TrainResult, train
from core.zeroth_order import train_zeroth_order

GENERATION_TEMPLATE = Template("{text}\n")


@dataclass
class Prepared:
    spec: TrainSpec
    train_set: Dataset
    eval_set: Dataset | None
    base: BaseModel
    learner: PromptLearner
    head: Head | None
    rows: list[Encoded]
    device: torch.device
    public_rows: list[Encoded] | None = None
    holdout_rows: list[Encoded] | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(spec: TrainSpec, *, train_path: Path, eval_path: Path | None, cache_dir: Path, device: str = "auto",
            max_rows: int | None = None, public_path: Path | None = None) -> Prepared:
    """Load and validate data, load the frozen base model, attach the prefix and the head, tokenise.

    ``public_path``: data the user declares public (Privacy-Flat's teacher and layer probe in formal mode).
    """
    seed_everything(spec.seed)
    dev = resolve_device(device)
    train_set = load_dataset(train_path, task=spec.task, label_names=spec.label_names, max_rows=max_rows)
    holdout = None
    if spec.audit_fraction > 0:  # non-members for the audit, split off before anything trains
        train_set, holdout = split_holdout(train_set, fraction=spec.audit_fraction, seed=spec.seed)
    names = spec.label_names or train_set.label_names
    eval_set = load_dataset(eval_path, task=spec.task, label_names=names) if eval_path else None
    public_set = load_dataset(public_path, task=spec.task, label_names=names) if public_path else None
    base = load_base_model(spec.model, cache_dir=cache_dir, seed=spec.seed)
    base.model.to(dev)
    learner = build_learner(base, tuning=spec.tuning, num_virtual_tokens=spec.num_virtual_tokens,
                            prefix_projection=spec.prefix_projection)
    head: Head | None = None
    if spec.task == "classification":
        k = train_set.num_labels or 2
        head = build_head(learner, num_labels=k, label_names=list(names) if names else None).to(dev)
    prep = Prepared(spec, train_set, eval_set, base, learner, head, [], dev)
    prep.rows = encode(prep, train_set.examples)
    prep.public_rows = encode(prep, public_set.examples) if public_set is not None else None
    prep.holdout_rows = encode(prep, holdout.examples) if holdout is not None else None
    return prep


def encode(prep: Prepared, examples: Any) -> list[Encoded]:
    """Tokenise examples the way this job's training rows are."""
    spec, tok = prep.spec, prep.base.tokenizer
    if prep.head is not None:
        names = list(spec.label_names or prep.train_set.label_names or [])
        return encode_classification(examples, tok, template=prep.head.template, choices=names,
                                     max_length=spec.max_length)
    return encode_generation(examples, tok, template=GENERATION_TEMPLATE, max_length=spec.max_length)


def evaluate(prep: Prepared, *, use_prompt: bool = True) -> dict[str, Any]:
    """Metrics on the evaluation set (empty dict when there is none)."""
    spec, ev = prep.spec, prep.eval_set
    if ev is None:
        return {}
    if spec.eval_max_examples is not None:
        ev = Dataset(ev.task, ev.examples[: spec.eval_max_examples], ev.label_names)
    if spec.task == "classification":
        assert prep.head is not None
        names = list(spec.label_names or prep.train_set.label_names or [])
        rows = encode_classification(ev.examples, prep.base.tokenizer, template=prep.head.template,
                                     choices=names, max_length=spec.max_length)
        return classification_metrics(prep.learner, prep.head, rows, num_labels=prep.train_set.num_labels or 2,
                                       device=prep.device, use_prompt=use_prompt)
    return generation_metrics(prep.learner, ev, template=GENERATION_TEMPLATE, max_length=spec.max_length,
                              max_new_tokens=spec.max_new_tokens, device=prep.device)


def flatness(prep: Prepared) -> dict[str, Any] | None:
    """Sharpness and 1-D landscape around the trained prefix, on up to ``flatness_probe`` evaluation rows."""
    spec, ev = prep.spec, prep.eval_set
    if ev is None or spec.flatness_probe == 0:
        return None
    examples = ev.examples[: min(spec.flatness_probe, spec.eval_max_examples or spec.flatness_probe)]
    loss_fn = probe_loss(prep.learner, prep.head, encode(prep, examples), device=prep.device)
    return measure(loss_fn, prep.learner.trainable_parameters(), rho=spec.flatness_rho, seed=spec.seed)


def select(prep: Prepared) -> FlatSetup:
    """Privacy-Flat's teacher and layer selection (nothing for other methods)."""
    spec, ev = prep.spec, prep.eval_set
    validation = encode(prep, ev.examples[: spec.selection_probe]) if ev is not None else None
    return setup(prep.learner, prep.head, spec, private_rows=prep.rows, public_rows=prep.public_rows,
                 validation_rows=validation, device=prep.device)


def guarantee_note(spec: TrainSpec, eps: float | None, delta: float, flat: dict[str, Any]) -> str:
    """One honest sentence (or three) on what the run's ε means."""
    seeded = (" Sampling and noise came from a seeded PRNG (noise_seed): the bound holds only while that seed "
              "stays secret." if spec.noise_seed is not None else "")
    if not spec.private:
        return "No formal (epsilon, delta) guarantee: the private data was used without clipping or noise."
    if spec.guarantee == "empirical":
        leaks = [what for on, what in ((spec.uses_awp, "AWP ascended along raw, un-noised gradients"),
                                       ("teacher" in flat, "the teacher prefix was trained on the private data"),
                                       ("selection" in flat, "layers were chosen on private validation data"))
                 if on]
        return ("No formal (epsilon, delta) guarantee (empirical mode): " + ("; ".join(leaks) or
                "the run was allowed to use private data outside the DP mechanism") +
                f". The DP-SGD steps alone account for epsilon={eps:.4g} at delta={delta:.3g}; that number is "
                "not a bound for this run. Privacy is supported empirically only (membership-inference audit).")
    extra = (" Privacy-Flat: AWP used only the previous privatised gradient, and the teacher and the layer probe "
             "used only the public data file." if spec.method == "privacy_flat" else "")
    return (f"({eps:.4g}, {delta:.3g})-DP for every example of the training set, by the {spec.accountant} "
            f"accountant over the recorded DP-SGD events.{extra}{seeded}")


def report(prep: Prepared, mech: Mechanism, result: TrainResult, metrics: dict[str, Any],
           zero_shot: dict[str, Any], seconds: float, flat: dict[str, Any] | None = None,
           privacy_flat: dict[str, Any] | None = None) -> dict[str, Any]:
    """The privacy report. It never overstates: a non-private or empirical run says it has no formal bound."""
    spec = prep.spec
    mech_eps = result.accountant.epsilon(delta=mech.delta) if spec.private else None
    formal = spec.guarantee == "formal"
    pf = dict(privacy_flat or {})
    if result.awp is not None:
        pf["awp_run"] = result.awp
    step = max(1, len(result.losses) // 200)
    return {
        "epsilon": mech_eps if formal else None, "delta": mech.delta if formal else None,
        "mechanism_epsilon": mech_eps, "trainer": spec.trainer,
        "noise_multiplier": mech.noise_multiplier, "sample_rate": mech.sample_rate, "steps": result.steps,
        "planned_steps": mech.steps, "accountant": spec.accountant,
        "max_grad_norm": spec.max_grad_norm if spec.private else None,
        "guarantee": spec.guarantee, "guarantee_note": guarantee_note(spec, mech_eps, mech.delta, pf),
        "noise_seeded": spec.noise_seed is not None, "privacy_flat": pf or None,
        "events": result.accountant.state_dict()["events"],
        "dataset": {"train_rows": len(prep.train_set), "eval_rows": len(prep.eval_set) if prep.eval_set else 0,
                    "label_names": list(spec.label_names or prep.train_set.label_names or []) or None},
        "head": prep.head.describe() if prep.head is not None else None,
        "metrics": metrics, "zero_shot_metrics": zero_shot, "flatness": flat,
        "train_loss": [round(x, 5) for x in result.losses[::step]],
        "timing": {"train_seconds": result.seconds, "total_seconds": seconds,
                   "examples_per_second": result.examples_seen / max(result.seconds, 1e-9)},
        "device": str(prep.device), "config": spec.to_dict(), "versions": versions(),
    }


def run_job(spec: TrainSpec, *, train_path: Path, out_dir: Path, cache_dir: Path, eval_path: Path | None = None,
            device: str = "auto", callback: ProgressFn | None = None, max_rows: int | None = None,
            mechanism: Mechanism | None = None, public_path: Path | None = None) -> dict[str, Any]:
    """prepare → calibrate → (zero-shot) evaluate → teacher and layer selection (privacy_flat) → train →
    evaluate → flatness → export. Returns the report.

    ``mechanism``: a plan made earlier (the service calibrates at submission and reserves budget for exactly
    that plan); it must be for this dataset's size. By default the plan is calibrated here.

    Raises:
        DatasetFormatError / InvalidSpec: bad data or settings, before anything trains.
        Cancelled: the callback returned False (nothing is exported).
    """
    start = time.perf_counter()
    notify = callback or (lambda _p: None)
    check_public_data(spec, has_public=public_path is not None)  # before any loading
    prep = prepare(spec, train_path=train_path, eval_path=eval_path, cache_dir=cache_dir, device=device,
                   max_rows=max_rows, public_path=public_path)
    mech = mechanism or calibrate(spec, n=len(prep.rows))
    notify(Progress("prepared", 0, mech.steps, metrics={"noise_multiplier": mech.noise_multiplier,
                                                        "sample_rate": mech.sample_rate, "delta": mech.delta}))
    zero_shot = evaluate(prep, use_prompt=False) if spec.task == "classification" else {}
    if spec.method == "privacy_flat":
        notify(Progress("privacy_flat_setup", 0, mech.steps))
    flat_setup = select(prep)
    trainer = train_zeroth_order if spec.trainer == "zeroth_order" else train
    result = trainer(prep.learner, prep.head, prep.rows, spec=spec, steps=mech.steps,
                     sample_rate=mech.sample_rate, noise_multiplier=mech.noise_multiplier, delta=mech.delta,
                     device=prep.device, callback=callback, distill=flat_setup.distill)
    notify(Progress("evaluate", mech.steps, mech.steps))
    metrics = evaluate(prep)
    notify(Progress("flatness", mech.steps, mech.steps))
    flat = flatness(prep)
    audit = None
    if prep.holdout_rows:
        notify(Progress("audit", mech.steps, mech.steps))
        audit = membership_audit(prep.learner, prep.head, prep.rows, prep.holdout_rows, device=prep.device,
                                 seed=spec.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if flat is not None:
        plot(flat, out_dir / "loss_landscape.png")
    save_adapter(prep.learner, prep.head, out_dir,
                 label_names=list(spec.label_names or prep.train_set.label_names or []) or None,
                 num_labels=prep.train_set.num_labels, spec=spec.to_dict())
    rep = report(prep, mech, result, metrics, zero_shot, time.perf_counter() - start, flat, flat_setup.report)
    rep["audit"] = audit
    write_report(rep, out_dir)
    notify(Progress("done", mech.steps, mech.steps, epsilon=rep["epsilon"], metrics=metrics))
    return rep
