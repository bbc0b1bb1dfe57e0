"""Privacy accounting (torch-free, on Google's ``dp_accounting``): the single source of truth for DP-SGD
noise calibration and epsilon reporting. Training is recorded as :class:`PrivacyEvent` s (runs of Poisson-
sampled Gaussian steps); the epsilon of several events is their *composition* (RDP or PLD), never a sum.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dp_accounting as dpa

from core.errors import InvalidSpec

ACCOUNTANTS = ("rdp", "pld")
ACCOUNTANT_FACTORIES: dict[str, Callable[[], Any]] = {
    "rdp": dpa.rdp.RdpAccountant, "pld": dpa.pld.PLDAccountant}
SIGMA_MAX = 1e4  # calibrate_noise never returns more noise than this
SIGMA_MIN = 1e-3  # ... and stops searching below this (the target is met anyway)
_STATE_VERSION = 1


class _DropOrderWarnings(logging.Filter):
    """dp_accounting logs a warning each time a fractional RDP order fails to converge (it then excludes that
    order, which can only loosen the bound, never understate ε). At high sample rates that is every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropOrderWarnings())
_NON_PRIVATE = "non-private"


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidSpec(message, param=param)


def _num(value: object, kind: type | tuple[type, ...] = (int, float)) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


@dataclass(frozen=True)
class PrivacyEvent:
    """One run of ``steps`` Poisson-sampled Gaussian DP-SGD steps (raises InvalidSpec on invalid values).

    ``noise_multiplier == 0`` is non-private (epsilon = inf); infinite noise, ``sample_rate == 0`` or
    ``steps == 0`` spend nothing.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        _require(_num(sigma) and sigma >= 0, "noise_multiplier",
                 f"noise_multiplier must be a number >= 0, got {sigma!r}")
        _require(_num(q) and 0 <= q <= 1, "sample_rate", f"sample_rate must be in [0, 1], got {q!r}")
        _require(_num(steps, int) and steps >= 0, "steps", f"steps must be an integer >= 0, got {steps!r}")

    @property
    def is_noop(self) -> bool:
        """True when the event spends no privacy (no steps, no sampling, or infinite noise)."""
        return self.steps == 0 or self.sample_rate == 0 or math.isinf(self.noise_multiplier)

    def to_dict(self) -> dict[str, Any]:
        """Returns a strict-JSON-serialisable dict (infinite noise is written as the string ``"inf"``)."""
        sigma: float | str = "inf" if math.isinf(self.noise_multiplier) else float(self.noise_multiplier)
        return {"noise_multiplier": sigma, "sample_rate": float(self.sample_rate), "steps": self.steps}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyEvent:
        """Builds an event from :meth:`to_dict` output; raises InvalidSpec if a field is missing/invalid."""
        try:
            sigma, q, steps = float(data["noise_multiplier"]), float(data["sample_rate"]), data["steps"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidSpec(f"malformed privacy event {data!r}: {exc!r}", param="events") from exc
        return cls(sigma, q, steps)


def _check_accountant(accountant: str) -> None:
    _require(accountant in ACCOUNTANT_FACTORIES, "accountant",
             f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    _require(_num(delta) and 0 < delta < 1, "delta", f"delta must be in (0, 1), got {delta!r}")


def _check_rate(q: float) -> None:
    _require(_num(q) and 0 < q <= 1, "sample_rate", f"sample_rate must be in (0, 1], got {q!r}")


def _merged(events: Iterable[PrivacyEvent]) -> list[PrivacyEvent]:
    """Drops no-op events and sums the steps of events sharing (sigma, q): composition commutes."""
    steps: dict[tuple[float, float], int] = {}
    for ev in events:
        if not ev.is_noop:
            key = (float(ev.noise_multiplier), float(ev.sample_rate))
            steps[key] = steps.get(key, 0) + ev.steps
    return [PrivacyEvent(s, q, n) for (s, q), n in steps.items()]


def _compose(acc: Any, events: Sequence[PrivacyEvent]) -> Any:
    for ev in events:
        gaussian = dpa.PoissonSampledDpEvent(ev.sample_rate, dpa.GaussianDpEvent(ev.noise_multiplier))
        acc.compose(dpa.SelfComposedDpEvent(gaussian, ev.steps))
    return acc


def _composed(events: Sequence[PrivacyEvent], accountant: str) -> Any:
    """A dp_accounting accountant holding ``events``; None if nothing is spent, or _NON_PRIVATE."""
    _check_accountant(accountant)
    merged = _merged(events)
    if not merged or any(ev.noise_multiplier == 0 for ev in merged):
        return _NON_PRIVATE if merged else None
    return _compose(ACCOUNTANT_FACTORIES[accountant](), merged)


def epsilon(events: Sequence[PrivacyEvent], *, delta: float, accountant: str = "rdp") -> float:
    """Composed epsilon of all events at ``delta``.

    Args:
        events: the privacy events to compose.
        delta: target delta, in (0, 1).
        accountant: one of :data:`ACCOUNTANTS`.

    Returns:
        epsilon: 0.0 when nothing was spent, ``math.inf`` if any event is non-private.

    Raises:
        InvalidSpec: on a bad ``delta`` or unknown ``accountant``.
    """
    _check_delta(delta)
    acc = _composed(events, accountant)
    return 0.0 if acc is None else math.inf if acc is _NON_PRIVATE else float(acc.get_epsilon(delta))


def delta_for(events: Sequence[PrivacyEvent], *, epsilon: float, accountant: str = "rdp") -> float:
    """Composed delta of all events at ``epsilon``.

    Args:
        events: the privacy events to compose.
        epsilon: target epsilon, finite and >= 0.
        accountant: one of :data:`ACCOUNTANTS`.

    Returns:
        delta: 0.0 when nothing was spent, 1.0 if any event is non-private.

    Raises:
        InvalidSpec: on a bad ``epsilon`` or unknown ``accountant``.
    """
    _require(_num(epsilon) and 0 <= epsilon < math.inf, "epsilon",
             f"epsilon must be a finite number >= 0, got {epsilon!r}")
    acc = _composed(events, accountant)
    return 0.0 if acc is None else 1.0 if acc is _NON_PRIVATE else float(min(1.0, acc.get_delta(epsilon)))


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
    prior: Sequence[PrivacyEvent] = (), tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier s with ``epsilon([*prior, PrivacyEvent(s, sample_rate, steps)]) <= target``.

    Brackets s, then runs a safeguarded secant search (epsilon decreases in s) until the achieved epsilon is
    in ``[target * (1 - tolerance), target]``. The result always meets the target.

    Args:
        target_epsilon: total epsilon allowed, including what ``prior`` already spent.
        delta: target delta, in (0, 1).
        sample_rate: Poisson sampling rate q, in (0, 1].
        steps: number of DP-SGD steps to run, >= 1.
        accountant: one of :data:`ACCOUNTANTS`.
        prior: events already charged to the same budget (e.g. earlier jobs on the dataset).
        tolerance: relative slack allowed below the target, in (0, 1).

    Returns:
        The noise multiplier.

    Raises:
        InvalidSpec: on invalid inputs, or if the target is unreachable (``prior`` alone reaches it, or even
            :data:`SIGMA_MAX` is not enough).
    """
    _require(_num(target_epsilon) and 0 < target_epsilon < math.inf, "target_epsilon",
             f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    _check_delta(delta)
    _check_rate(sample_rate)
    _require(_num(steps, int) and steps >= 1, "steps", f"steps must be an integer >= 1, got {steps!r}")
    _require(_num(tolerance) and 0 < tolerance < 1, "tolerance",
             f"tolerance must be in (0, 1), got {tolerance!r}")
    spent = epsilon(prior, delta=delta, accountant=accountant)  # also validates ``accountant``
    _require(spent < target_epsilon, "target_epsilon",
             f"target_epsilon {target_epsilon:g} is unreachable: earlier runs already spent {spent:.4g}")
    merged_prior = _merged(prior)
    base = _compose(ACCOUNTANT_FACTORIES[accountant](), merged_prior)  # composed once, copied per trial

    def eps_at(sigma: float) -> float:
        trial = _compose(copy.deepcopy(base), [PrivacyEvent(sigma, sample_rate, steps)])
        return float(trial.get_epsilon(delta))

    start, factor = 1.0, 2.0
    if accountant != "rdp":  # RDP is cheap and looser than PLD: its sigma is a near upper bracket
        try:
            start = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                    steps=steps, prior=merged_prior, tolerance=tolerance)
            factor = 1.1
        except InvalidSpec:
            pass
    lo = hi = start
    eps_lo = eps_hi = eps_at(start)
    while eps_lo <= target_epsilon:  # shrink sigma until the target is missed
        if lo <= SIGMA_MIN:
            return lo
        hi, eps_hi, lo = lo, eps_lo, lo / factor
        eps_lo = eps_at(lo)
    while eps_hi > target_epsilon:  # grow sigma until the target is met
        _require(hi < SIGMA_MAX, "target_epsilon", f"target_epsilon {target_epsilon:g} is unreachable with "
                 f"noise_multiplier <= {SIGMA_MAX:g} (earlier runs spent epsilon {spent:.4g})")
        lo, eps_lo, hi = hi, eps_hi, min(hi * factor, SIGMA_MAX)
        eps_hi = eps_at(hi)
    # Safeguarded secant on (log sigma, log eps), keeping eps_at(lo) > target >= eps_at(hi).
    goal = math.log(target_epsilon * (1 - tolerance / 2))
    while eps_hi < target_epsilon * (1 - tolerance) and hi - lo > 1e-9 * hi:
        t = 0.5
        if math.isfinite(eps_lo) and eps_hi > 0:
            t = (math.log(eps_lo) - goal) / (math.log(eps_lo) - math.log(eps_hi))
        mid = math.exp(math.log(lo) + min(max(t, 0.1), 0.9) * (math.log(hi) - math.log(lo)))
        eps_mid = eps_at(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo, eps_lo = mid, eps_mid
    return hi


def sample_rate_for(*, batch_size: int, dataset_size: int) -> float:
    """Sampling rate ``batch_size / dataset_size``; InvalidSpec unless 1 <= batch_size <= dataset_size."""
    for name, value in (("batch_size", batch_size), ("dataset_size", dataset_size)):
        _require(_num(value, int) and value >= 1, name, f"{name} must be an integer >= 1, got {value!r}")
    _require(batch_size <= dataset_size, "batch_size",
             f"batch_size ({batch_size}) must not exceed dataset_size ({dataset_size})")
    return batch_size / dataset_size


def steps_for(*, epochs: float, sample_rate: float) -> int:
    """Steps for ``epochs`` passes at rate q, ``ceil(epochs / q)`` (InvalidSpec on bad epochs/sample_rate)."""
    _require(_num(epochs) and 0 < epochs < math.inf, "epochs",
             f"epochs must be a positive finite number, got {epochs!r}")
    _check_rate(sample_rate)
    exact = epochs / sample_rate
    nearest = round(exact)
    return max(1, nearest if abs(exact - nearest) <= 1e-9 * max(1.0, exact) else math.ceil(exact))


class PrivacyAccountant:
    """Stateful ledger of one training job; checkpoint :meth:`state_dict` so a resumed job never recounts.

    Args:
        accountant: one of :data:`ACCOUNTANTS` (InvalidSpec otherwise).
        events: events already spent by this job (e.g. restored from a checkpoint).
    """

    def __init__(self, *, accountant: str = "rdp", events: Iterable[PrivacyEvent] = ()) -> None:
        _check_accountant(accountant)
        self.accountant = accountant
        self._events: list[PrivacyEvent] = []
        for ev in events:
            self.step(noise_multiplier=ev.noise_multiplier, sample_rate=ev.sample_rate, steps=ev.steps)

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """The recorded events; consecutive steps with equal (noise_multiplier, sample_rate) are merged."""
        return tuple(self._events)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Records ``steps`` DP-SGD steps (no-op steps are dropped); raises InvalidSpec on invalid values."""
        new = PrivacyEvent(noise_multiplier, sample_rate, steps)
        if new.is_noop:
            return
        last = self._events[-1] if self._events else None
        if last is not None and (last.noise_multiplier, last.sample_rate) == (noise_multiplier, sample_rate):
            self._events[-1] = PrivacyEvent(last.noise_multiplier, last.sample_rate, last.steps + steps)
        else:
            self._events.append(new)

    def epsilon(self, *, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (see :func:`epsilon`)."""
        return epsilon(self._events, delta=delta, accountant=self.accountant)

    def state_dict(self) -> dict[str, Any]:
        """Returns a strict-JSON-serialisable snapshot of the ledger."""
        return {"version": _STATE_VERSION, "accountant": self.accountant,
                "events": [ev.to_dict() for ev in self._events]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replaces this state (accountant included) with a :meth:`state_dict`; InvalidSpec if malformed."""
        _require(isinstance(state, Mapping) and isinstance(state.get("events"), list), "state",
                 "privacy accountant state must be a mapping with an 'events' list")
        version = state.get("version", _STATE_VERSION)
        _require(version == _STATE_VERSION, "state", f"unsupported accountant state version {version!r}")
        restored = PrivacyAccountant(accountant=state.get("accountant", self.accountant),
                                     events=[PrivacyEvent.from_dict(e) for e in state["events"]])
        self.accountant, self._events = restored.accountant, restored._events
