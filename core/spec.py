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
METHODS = ("dp_prefix", "privacy_flat", "non_private")
TUNINGS = ("prefix", "prompt")
OPTIMIZERS = ("adam", "sgd")
GUARANTEES = ("formal", "empirical", "none")
TRAINERS = ("first_order", "zeroth_order")
REMOVALS = ("mask", "zero")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class TrainSpec:
    """Everything that decides what a training run does. Deployment details (paths, devices) stay outside."""

    model: str = _help("Base model: a registry name (`minilm`, `smollm2-135m`, ...) or a local HF folder.",
                       default="minilm")
    task: str = _help("`classification` or `generation`.", default="classification")
    method: str = _help("`dp_prefix` (DP-SGD), `privacy_flat` (DP-SGD + AWP, layer selection, distillation) or "
                        "`non_private` (same loop, no clipping, no noise).", default="dp_prefix")
    guarantee: str = _help("`formal`: every use of the private data goes through the DP mechanism, the report's ε "
                           "is an (ε, δ)-DP bound. `empirical` (privacy_flat only, must be asked for): the "
                           "paper's recipe (raw-gradient AWP, teacher and layer probe on private data); no formal "
                           "bound holds. Non-private runs are `none`.", default="formal")
    trainer: str = _help("`first_order` (DP-SGD on per-example gradients) or `zeroth_order` (forward-only "
                         "DP-ZO: two perturbed forward passes per step, clipped scalar differences).",
                         default="first_order")
    zo_mu: float = _help("Zeroth-order perturbation scale μ (the step is μ·z, z ~ N(0, I)).", default=1e-3)
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
    audit_fraction: float = _help("Share of the training file held out before training as non-members of a "
                                  "loss-threshold membership-inference audit (0: no audit).", default=0.0)
    # Privacy-Flat parts (method privacy_flat); each can be switched off for ablations.
    awp: bool = _help("Within-layer flatness: adversarial weight perturbation during the first rounds.",
                      default=True)
    awp_gamma: float = _help("AWP radius, relative per prefix layer: ‖v_l‖ = γ·‖w_l‖.", default=0.05)
    awp_fraction: float = _help("Share of the steps (from the start) that use AWP.", default=0.5)
    awp_steps: int = _help("Ascent steps per perturbation (empirical mode only; formal mode has one: the "
                           "previous privatised gradient).", default=1)
    layer_selection: bool = _help("Cross-layer flatness: keep only the prefix layers whose presence flattens "
                                  "the loss most (white-box prefix only).", default=True)
    keep_layers: int | None = _help("Prefix layers to keep (default: ceil(3/4 of the layers)).", default=None)
    layer_removal: str = _help("`mask`: removed layers' prefix is masked out of attention; `zero`: its keys "
                               "and values are zeroed (the paper; still takes softmax mass).", default="mask")
    selection_probe: int = _help("Probe examples for the layer indicator.", default=64)
    selection_directions: int = _help("Random directions per layer for the indicator.", default=4)
    distillation: bool = _help("Cross-model flatness: pull the prefix toward a non-private teacher prefix.",
                               default=True)
    distill_lambda: float = _help("Weight λ of ‖P − P_teacher‖₂ inside every per-example loss.", default=0.01)
    distill_logits: float = _help("Weight of an extra KL(teacher ‖ student) output term (0: off).", default=0.0)
    teacher_epochs: float = _help("Passes of the non-private teacher over its data.", default=1.0)
    teacher_batch_size: int = _help("Teacher batch size (non-private).", default=32)

    def __post_init__(self) -> None:
        _choice(self.task, TASKS, "task")
        _choice(self.method, METHODS, "method")
        _choice(self.tuning, TUNINGS, "tuning")
        _choice(self.optimizer, OPTIMIZERS, "optimizer")
        _choice(self.trainer, TRAINERS, "trainer")
        _choice(self.layer_removal, REMOVALS, "layer_removal")
        self._check_guarantee()
        self._check_flat()
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

    def _check_guarantee(self) -> None:
        _choice(self.guarantee, GUARANTEES, "guarantee")
        if not self.private:  # nothing private about the run's mechanism: say so, whatever was asked
            object.__setattr__(self, "guarantee", "none")
        elif self.guarantee == "none":
            raise InvalidSpec("a private method has guarantee formal or empirical", param="guarantee")
        elif self.guarantee == "empirical" and self.method != "privacy_flat":
            raise InvalidSpec("guarantee 'empirical' exists only for method privacy_flat", param="guarantee")

    def _check_flat(self) -> None:
        _positive_float(self.awp_gamma, "awp_gamma")
        _positive_float(self.distill_lambda, "distill_lambda")
        _positive_float(self.teacher_epochs, "teacher_epochs")
        _positive_float(self.zo_mu, "zo_mu")
        _positive_int(self.awp_steps, "awp_steps")
        _positive_int(self.selection_probe, "selection_probe")
        _positive_int(self.selection_directions, "selection_directions")
        _positive_int(self.teacher_batch_size, "teacher_batch_size")
        if self.keep_layers is not None:
            _positive_int(self.keep_layers, "keep_layers")
        if not (0 <= self.audit_fraction < 1):
            raise InvalidSpec(f"audit_fraction must be in [0, 1), got {self.audit_fraction}", param="audit_fraction")
        if not (0 <= self.awp_fraction <= 1):
            raise InvalidSpec(f"awp_fraction must be in [0, 1], got {self.awp_fraction}", param="awp_fraction")
        if not (math.isfinite(self.distill_logits) and self.distill_logits >= 0):
            raise InvalidSpec(f"distill_logits must be >= 0, got {self.distill_logits}", param="distill_logits")
        if self.uses_awp and self.guarantee == "formal" and self.awp_steps > 1:
            # A second ascent step needs the gradient at the perturbed point: a fresh, un-noised private query.
            raise InvalidSpec("formal mode ascends once, along the previous privatised gradient; awp_steps > 1 "
                              "needs guarantee 'empirical'", param="awp_steps")

    @property
    def private(self) -> bool:
        return self.method != "non_private"

    @property
    def uses_awp(self) -> bool:
        return self.method == "privacy_flat" and self.awp and self.awp_fraction > 0

    @property
    def uses_layer_selection(self) -> bool:
        """Only a per-layer prefix has layers to select (a soft prompt enters at the input only)."""
        return self.method == "privacy_flat" and self.layer_selection and self.tuning == "prefix"

    @property
    def uses_distillation(self) -> bool:
        return self.method == "privacy_flat" and self.distillation

    @property
    def needs_public_data(self) -> bool:
        """Formal mode trains the teacher and probes layers on data declared public, never the private set."""
        return self.guarantee == "formal" and (self.uses_layer_selection or self.uses_distillation)

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


def check_public_data(spec: TrainSpec, *, has_public: bool) -> None:
    """Raise InvalidSpec (``public_data``) when formal Privacy-Flat would need public data it does not have."""
    if spec.needs_public_data and not has_public:
        raise InvalidSpec("formal Privacy-Flat trains its teacher and probes layers on public data only: give a "
                          "public data file, or turn off distillation and layer selection, or ask for the "
                          "empirical guarantee", param="public_data")
