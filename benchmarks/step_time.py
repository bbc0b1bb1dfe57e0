"""Speed benchmark (not a test): DP step vs non-private step, and dynamic vs fixed padding.

Prints, side by side in one run on this machine:
  * median step time (forward + backward + update, batch 32) of non-private and DP-SGD (Opacus hooks) for
    ``minilm`` classification on SST-2 and ``smollm2-135m`` generation on E2E, and their ratio (target ≤ 1.10);
  * real tokens/s of forward+backward with dynamic padding over length-sorted chunks vs padding to 128 (target ≥ 8x).
Ratios, not absolute seconds, are what to compare on a shared machine.

    python -m benchmarks.step_time [--steps 8] [--datasets ../shared/datasets]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from core.batching import Batch, collate, encode_classification, encode_generation, length_chunks
from core.data import load_dataset
from core.dp import DPGradient
from core.heads import build_head
from core.models import load_base_model
from core.objective import classification_losses, completion_losses
from core.pipeline import GENERATION_TEMPLATE
from core.prompting import build_learner
from core.train import trainable_module


def _setup(model: str, datasets: Path, cache: Path, n: int):  # noqa: ANN202
    base = load_base_model(model, cache_dir=cache)
    learner = build_learner(base, tuning="prefix", num_virtual_tokens=10)
    if model == "minilm":
        ds = load_dataset(datasets / "sst2" / "train.tsv", task="classification", max_rows=n)
        head = build_head(learner, num_labels=2, label_names=["terrible", "great"])
        rows = encode_classification(ds.examples, base.tokenizer, template=head.template,
                                     choices=["terrible", "great"], max_length=128)
        return learner, head, rows
    ds = load_dataset(datasets / "e2e" / "devset.csv", task="generation", max_rows=n)
    return learner, None, encode_generation(ds.examples, base.tokenizer, template=GENERATION_TEMPLATE, max_length=128)


def _loss(learner, head, batch: Batch) -> torch.Tensor:  # noqa: ANN001
    return classification_losses(learner, head, batch)[0] if head is not None else completion_losses(learner, batch)[0]


def step_times(learner, head, rows, *, private: bool, steps: int, batch: int = 32) -> float:  # noqa: ANN001
    dp = DPGradient(trainable_module(learner, head), max_grad_norm=0.1, noise_multiplier=1.0, private=private,
                    generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(dp.params, lr=1e-3)
    learner.train(True)
    pad = learner.base.tokenizer.pad_token_id
    g = torch.Generator().manual_seed(1)
    times = []
    for i in range(steps + 2):
        idx = torch.randperm(len(rows), generator=g)[:batch].tolist()
        b = collate([rows[j] for j in sorted(idx, key=lambda j: len(rows[j]))], pad_id=pad)
        t = time.perf_counter()
        dp.accumulate(_loss(learner, head, b))
        dp.finish(expected_batch_size=batch)
        opt.step()
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t)
    dp.close()  # remove the Opacus hooks so the next measurement is clean
    return statistics.median(times)


def padding_throughput(learner, head, rows, *, fixed: int | None, seconds_cap: float = 60.0) -> float:  # noqa: ANN001
    pad = learner.base.tokenizer.pad_token_id
    tokens, start = 0, time.perf_counter()
    for chunk in length_chunks(range(len(rows)), [len(r) for r in rows], max_rows=32):
        b = collate([rows[i] for i in chunk], pad_id=pad)
        if fixed:
            extra = fixed - b.input_ids.shape[1]
            b = Batch(torch.nn.functional.pad(b.input_ids, (0, extra), value=pad),
                      torch.nn.functional.pad(b.attention_mask, (0, extra)), b.labels, b.answer_pos, b.targets)
        _loss(learner, head, b).sum().backward()
        tokens += int(b.attention_mask.sum())
        if time.perf_counter() - start > seconds_cap:
            break
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--datasets", type=Path, default=Path(os.environ.get("PFLAT_DATASETS", "../shared/datasets")))
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("PFLAT_CACHE_DIR",
                                                                      Path.home() / ".cache" / "pflat")))
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu, batch 32, prefix 10 tokens")
    print("| model | task | non-private step (s) | DP step, hooks (s) | DP / non-private |")
    print("|---|---|---|---|---|")
    for model, task in (("minilm", "classification"), ("smollm2-135m", "generation")):
        learner, head, rows = _setup(model, args.datasets, args.cache, 512)
        np_t = step_times(learner, head, rows, private=False, steps=args.steps)
        dp_t = step_times(learner, head, rows, private=True, steps=args.steps)
        print(f"| {model} | {task} | {np_t:.3f} | {dp_t:.3f} | {dp_t / np_t:.2f} |", flush=True)
    learner, head, rows = _setup("minilm", args.datasets, args.cache, 1024)
    dyn = padding_throughput(learner, head, rows, fixed=None)
    fix = padding_throughput(learner, head, rows, fixed=128)
    print("\n| SST-2, minilm, fwd+bwd | real tokens/s |\n|---|---|")
    print(f"| dynamic padding, length-sorted chunks | {dyn:.0f} |\n| fixed padding to 128 | {fix:.0f} |")
    print(f"| speed-up | {dyn / fix:.1f}x |")


if __name__ == "__main__":
    main()
