"""The KL coefficient of PPO's KL-shaped reward: fixed, or adapted toward a target KL.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", eq. 2), as
verl's `AdaptiveKLController` and TRL's former PPOTrainer run it: after each rollout batch

    error = clip(KL / target_kl - 1, -0.2, 0.2)
    coef  = coef * (1 + error * n / horizon)

where KL is the batch's measured KL to the reference and n the number of samples in it, so
a KL above target raises the penalty and one below lowers it, by at most 20% of n/horizon
per batch. The KL measured is verl's: k1 (log pi_old - log pi_ref) averaged over each
sample's completion tokens, then over the samples.

    ctl = kl_controller("adaptive", kl_coef=0.05, target_kl=0.1, horizon=10000)
    coef = ctl.value                     # shape this batch's rewards with it
    ctl.update(current_kl=0.3, n=64)     # then adapt for the next
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FixedKLController:
    """`kl_ctrl.type: fixed`: the coefficient never moves."""

    value: float

    def update(self, current_kl: float, n: int) -> None:
        """Nothing to adapt."""


@dataclass
class AdaptiveKLController:
    """`kl_ctrl.type: adaptive`: proportional control of the coefficient (see module)."""

    value: float
    target_kl: float
    horizon: int

    def update(self, current_kl: float, n: int) -> None:
        error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon


def kl_controller(kind: str, *, kl_coef: float, target_kl: float,
                  horizon: int) -> FixedKLController | AdaptiveKLController:
    """The controller `ppo.kl_ctrl.type` names, starting at `kl_coef`."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"kl controller {kind!r} is not one of: fixed, adaptive")
