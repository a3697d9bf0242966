"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences")."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class FixedKLController:
    """kl_coef stays at its initial value."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """No change."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards `target`:

    e = clip(KL / target - 1, -0.2, 0.2);  kl_coef <- kl_coef * (1 + e * n_steps / horizon)
    where n_steps is the number of samples (episodes) in the batch, as in Ziegler et al.
    A non-finite KL is skipped (coefficient unchanged).
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> None:
        # One NaN/inf KL (a diverged batch) would make the coefficient NaN for the rest of the run, and the
        # checkpoint (strict JSON) unwritable: such a step leaves the coefficient unchanged.
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def make_kl_controller(coef: float, adaptive: bool, target: float, horizon: float):
    """Fixed or adaptive controller from config values."""
    return AdaptiveKLController(coef, target, horizon) if adaptive else FixedKLController(coef)
