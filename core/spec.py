"""Job specifications: frozen, validated dataclasses that the API schema and the CLI map onto.

A spec is stored with the job and with its artifacts (``privacy_report.json["config"]``), so every field has
a default that is safe, a help text, and a validation rule that raises :class:`InvalidSpec` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from core.accounting import ACCOUNTANTS
from core.errors import InvalidSpec

TASKS = ("classification", "generation")
METHODS = ("dp_prefix", "non_private")
TUNINGS = ("prefix", "prompt")
OPTIMIZERS = ("adam", "sgd")
GUARANTEES = ("formal", "none")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class TrainSpec:
    """Everything that decides what a training run does. Deployment details (paths, devices) stay outside."""

    model: str = _help("Base model: a registry name (`minilm`, `smollm2-135m`, ...) or a local HF folder.",
                       default="minilm")
    task: str = _help("`classification` or `generation`.", default="classification")
    method: str = _help("`dp_prefix` (DP-SGD) or `non_private` (same loop, no clipping, no noise).",
                        default="dp_prefix")
    tuning: str = _help("`prefix` (per-layer key/value prefix, white-box) or `prompt` (input soft prompt, "
                        "black-box).", default="prefix")
    num_virtual_tokens: int = _help("Length of the prefix / soft prompt.", default=10)
    prefix_projection: bool = _help("Reparametrise the prefix through an MLP (Li & Liang 2021).", default=False)
    epochs: float = _help("Passes over the training set (in expectation under Poisson sampling).", default=1.0)
    max_steps: int | None = _help("Stop after this many optimizer steps (overrides epochs when smaller).",
                                  default=None)
    batch_size: int = _help("Expected logical batch size; the sample rate is batch_size / n.", default=256)
    physical_batch_size: int = _help("Examples per forward/backward pass (memory bound only).", default=32)
    lr: float = _help("Learning rate.", default=1e-2)
    optimizer: str = _help("`adam` or `sgd`.", default="adam")
    weight_decay: float = _help("Decoupled weight decay (AdamW).", default=0.0)
    target_epsilon: float | None = _help("Privacy budget ε for this job (dp methods).", default=3.0)
    target_delta: float | None = _help("δ; must be below 1/n. Default: min(1e-5, 1/(10 n)).", default=None)
    max_grad_norm: float = _help("Per-example clipping bound C (prefix gradients are small: ~0.1).", default=0.1)
    accountant: str = _help("`rdp` (default) or `pld`.", default="rdp")
    seed: int = _help("Seeds initialisation and data order of evaluation.", default=0)
    noise_seed: int | None = _help("Seeds Poisson sampling and the DP noise. None (default): fresh OS entropy, "
                                   "as the guarantee assumes; an int makes runs repeatable (tests, debugging) "
                                   "and the report says so.", default=None)
    label_names: tuple[str, ...] | None = _help("Verbalizer words per label index (classification).",
                                                default=None)
    max_length: int = _help("Truncate inputs to this many tokens (never pads to it).", default=128)
    max_new_tokens: int = _help("Greedy decoding length for generation metrics.", default=48)
    eval_max_examples: int | None = _help("Evaluate on at most this many examples.", default=None)
    flatness_probe: int = _help("Evaluation examples used to measure sharpness and the loss landscape "
                                "(0: skip; at most eval_max_examples).", default=64)
    flatness_rho: float = _help("Relative radius ρ of the flatness measurement.", default=0.05)

    def __post_init__(self) -> None:
        _choice(self.task, TASKS, "task")
        _choice(self.method, METHODS, "method")
        _choice(self.tuning, TUNINGS, "tuning")
        _choice(self.optimizer, OPTIMIZERS, "optimizer")
        _choice(self.accountant, ACCOUNTANTS, "accountant")
        _positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        _positive_int(self.batch_size, "batch_size")
        _positive_int(self.physical_batch_size, "physical_batch_size")
        _positive_int(self.max_length, "max_length")
        _positive_int(self.max_new_tokens, "max_new_tokens")
        if self.max_steps is not None:
            _positive_int(self.max_steps, "max_steps")
        if self.eval_max_examples is not None:
            _positive_int(self.eval_max_examples, "eval_max_examples")
        _positive_float(self.epochs, "epochs")
        _positive_float(self.flatness_rho, "flatness_rho")
        if isinstance(self.flatness_probe, bool) or not isinstance(self.flatness_probe, int) or self.flatness_probe < 0:
            raise InvalidSpec(f"flatness_probe must be an integer >= 0, got {self.flatness_probe!r}",
                              param="flatness_probe")
        _positive_float(self.lr, "lr")
        _positive_float(self.max_grad_norm, "max_grad_norm")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidSpec(f"weight_decay must be >= 0, got {self.weight_decay}", param="weight_decay")
        if self.private:
            if self.target_epsilon is None:
                raise InvalidSpec("target_epsilon is required for a private method", param="target_epsilon")
            _positive_float(self.target_epsilon, "target_epsilon")
        if self.target_delta is not None and not (0 < self.target_delta < 1):
            raise InvalidSpec(f"target_delta must be in (0, 1), got {self.target_delta}", param="target_delta")
        if self.label_names is not None:
            names = tuple(self.label_names)
            if len(names) < 2 or any(not isinstance(n, str) or not n.strip() for n in names):
                raise InvalidSpec("label_names needs at least two non-empty strings", param="label_names")
            if len(set(names)) != len(names):
                raise InvalidSpec("label_names must be distinct", param="label_names")
            object.__setattr__(self, "label_names", names)

    @property
    def private(self) -> bool:
        return self.method != "non_private"

    @property
    def guarantee(self) -> str:
        """`formal` when every use of the private data went through the DP mechanism, else `none`."""
        return "formal" if self.private else "none"

    def delta_for(self, n: int) -> float:
        """The δ this job uses on a dataset of ``n`` examples; raises when δ ≥ 1/n (no meaningful guarantee)."""
        delta = self.target_delta if self.target_delta is not None else min(1e-5, 1.0 / (10 * n))
        if delta >= 1.0 / n:
            raise InvalidSpec(f"target_delta={delta:g} must be below 1/n = {1.0 / n:g} for n={n} examples",
                              param="target_delta")
        return delta

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["label_names"] is not None:
            out["label_names"] = list(out["label_names"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSpec(f"unknown setting(s): {', '.join(unknown)}", param=unknown[0])
        kwargs = dict(data)
        if kwargs.get("label_names") is not None:
            kwargs["label_names"] = tuple(kwargs["label_names"])
        return cls(**kwargs)


def _choice(value: str, allowed: tuple[str, ...], param: str) -> None:
    if value not in allowed:
        raise InvalidSpec(f"{param} must be one of {', '.join(allowed)}; got {value!r}", param=param)


def _positive_int(value: int, param: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSpec(f"{param} must be a positive integer, got {value!r}", param=param)


def _positive_float(value: float, param: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidSpec(f"{param} must be a positive finite number, got {value!r}", param=param)
