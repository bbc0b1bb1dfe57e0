"""Small builders shared by the core tests: tiny random models and toy data."""

from __future__ import annotations

from pathlib import Path

import torch

from core.batching import Encoded, collate, encode_classification, encode_generation
from core.data import Example
from core.heads import Head, build_head
from core.models import load_base_model
from core.pipeline import GENERATION_TEMPLATE
from core.prompting import PromptLearner, build_learner

WORDS = ["good", "bad", "great", "awful", "fine", "movie", "plot", "the", "a", "very", "not", "acting"]


def toy_examples(n: int, *, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(5, len(WORDS), (k,), generator=g)]
        words.insert(int(torch.randint(0, k, (1,), generator=g)), "good" if i % 2 else "bad")  # the signal
        out.append(Example(" ".join(words), i % 2, completion=" ".join(reversed(words))))
    return out


def tiny_learner(name: str, *, tuning: str = "prefix", p: int = 4, seed: int = 0) -> PromptLearner:
    base = load_base_model(name, cache_dir=Path("/nonexistent"), seed=seed)
    return build_learner(base, tuning=tuning, num_virtual_tokens=p)


def tiny_rows(learner: PromptLearner, n: int, *, task: str = "classification",
              head_kind: str | None = None) -> tuple[Head | None, list[Encoded]]:
    exs = toy_examples(n)
    tok = learner.base.tokenizer
    if task == "generation":
        return None, encode_generation(exs, tok, template=GENERATION_TEMPLATE, max_length=32)
    head = build_head(learner, num_labels=2, label_names=["bad", "good"], kind=head_kind)
    return head, encode_classification(exs, tok, template=head.template, choices=["bad", "good"], max_length=32)


def batch_of(learner: PromptLearner, rows: list[Encoded]):  # noqa: ANN201
    return collate(rows, pad_id=learner.base.tokenizer.pad_token_id)
