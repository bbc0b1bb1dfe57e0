"""Plan a job's DP-SGD mechanism before it runs (torch-free, so the API can answer estimates and refuse an
over-budget job synchronously, with the very numbers the worker will then use)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from core import accounting
from core.spec import TrainSpec


@dataclass(frozen=True)
class Mechanism:
    """The calibrated DP-SGD mechanism: ``steps`` steps at ``sample_rate`` with noise ``noise_multiplier``."""

    steps: int
    sample_rate: float
    noise_multiplier: float
    delta: float

    def event(self, steps: int | None = None) -> accounting.PrivacyEvent:
        """The privacy event of ``steps`` of these steps (all of them by default)."""
        return accounting.PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps if steps is None else steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mechanism:
        return cls(int(data["steps"]), float(data["sample_rate"]), float(data["noise_multiplier"]),
                   float(data["delta"]))


def calibrate(spec: TrainSpec, *, n: int, prior: Sequence[accounting.PrivacyEvent] = ()) -> Mechanism:
    """Sample rate q = B/n, steps T = ceil(epochs/q) (capped by ``max_steps``), and the smallest σ that meets
    ``target_epsilon`` at δ (σ = 0 for a non-private job). ``prior`` events are composed in first.

    Raises:
        InvalidSpec: δ ≥ 1/n, or an unreachable ε target.
    """
    q = accounting.sample_rate_for(batch_size=min(spec.batch_size, n), dataset_size=n)
    steps = accounting.steps_for(epochs=spec.epochs, sample_rate=q)
    if spec.max_steps is not None:
        steps = min(steps, spec.max_steps)
    delta = spec.delta_for(n)
    sigma = 0.0
    if spec.private:
        assert spec.target_epsilon is not None
        sigma = accounting.calibrate_noise(target_epsilon=spec.target_epsilon, delta=delta, sample_rate=q,
                                           steps=steps, accountant=spec.accountant, prior=prior)
    return Mechanism(steps, q, sigma, delta)
