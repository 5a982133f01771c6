"""GRPO's loss in the form the trainer used before the algorithms were split (kept for callers).

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300) samples a group of G completions
per prompt, scores them, and uses the reward normalised within the group as the advantage
of every token of a completion; the policy loss is PPO's clipped surrogate plus a KL penalty
to a frozen reference measured with Schulman's k3 estimator, token-mean aggregated.

The pieces live in `advantages.py` (estimators, the `ADVANTAGE_ESTIMATORS` registry) and
`losses.py` (`policy_loss` with clip-higher, aggregations, GSPO's ratio, k1/k2/k3); this
module re-exports the names it always had, and `grpo_loss` is `policy_loss` with GRPO's
defaults (bitwise the same numbers as before the split).
"""

from __future__ import annotations

import torch

from hpcalign.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    group_advantages,
    rloo_advantages,
)
from hpcalign.algorithms.losses import kl_k3, policy_loss, sft_loss

__all__ = ["ADVANTAGE_ESTIMATORS", "group_advantages", "grpo_loss", "kl_k3", "rloo_advantages",
           "sft_loss"]


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    kl_coef: float,
    token_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + kl_coef * k3, summed over masked tokens / `token_count`.

    `logp` (with grad), `old_logp`, `ref_logp`, `mask`: [B, T]; `advantages`: [B].
    `token_count` defaults to `mask.sum()`; data-parallel callers pass the global number of
    completion tokens so that summing every rank's loss gives the mean over all tokens.
    Metrics: `pg_loss`, `kl` (mean k3), `clip_frac`, `ratio_mean` (see `policy_loss`).
    """
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B={logp.shape[0]}]")
    return policy_loss(logp, old_logp, advantages, mask, clip_eps_low=clip_eps,
                       ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator="k3",
                       token_count=token_count)
