"""GRPO as pure tensor functions: group-normalised advantages, clipped policy loss, k3 KL.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300) samples a group of G completions
per prompt, scores them, and uses the reward normalised within the group as the advantage
of every token of a completion; the policy loss is PPO's clipped surrogate plus a KL penalty
to a frozen reference measured with Schulman's k3 estimator.

Choices (written here so the trainer and tests agree):
- Group std is the unbiased (Bessel, n - 1) sample std, `torch.std`'s default and what the
  reference implementations of DeepSeekMath's GRPO (TRL's GRPOTrainer, verl's
  `compute_grpo_outcome_advantage`) use; the paper writes std(r) without saying which.
  A group of one has no baseline to compare with: its advantage is 0 (verl instead uses the
  raw reward there, which is not group-relative).
- Loss aggregation is a token mean: the sum over every completion token of every sequence
  divided by the number of such tokens (`token_count`, the global count under data
  parallelism), as in DAPO and verl's "token-mean", so long completions are not down-weighted.

Estimators are registered by name in `ADVANTAGE_ESTIMATORS` (a plain dict, like verl's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# log-ratios are clamped to +-20 inside k3 so exp() cannot overflow on a far-off token
_KL_LOG_RATIO_CLAMP = 20.0


def _group_stats(
    rewards: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element group mean, group size and sum of squared deviations (all [N]).

    NaN rewards (unscorable samples) are left out of their group's statistics: the count,
    mean and deviations are those of the scored members only.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be "
            "equal-length 1-D tensors"
        )
    scored = ~torch.isnan(rewards)
    values = torch.where(scored, rewards.double(), 0.0)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, scored.double())
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, values)
    mean = (sums / counts.clamp(min=1))[inverse]
    deviations = torch.where(scored, values - mean, 0.0) ** 2
    sq_dev = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, deviations)
    return mean, counts[inverse], sq_dev[inverse]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """GRPO advantages [N]: (r - group mean) / (unbiased group std + eps).

    `rewards` [N] float, `group_ids` [N] any integers (equal id = same prompt). With
    `scale_by_std=False` only the mean is subtracted (Dr. GRPO). A NaN reward (every reward
    function returned None) gets advantage 0 and is left out of its group's mean and std,
    as in TRL's GRPOTrainer.
    """
    mean, count, sq_dev = _group_stats(rewards, group_ids)
    advantages = rewards.double() - mean
    if scale_by_std:
        std = torch.where(count > 1, sq_dev / (count - 1).clamp(min=1), 0.0).sqrt()
        advantages = advantages / (std + eps)
    advantages = torch.where(torch.isnan(rewards), 0.0, advantages)
    return advantages.to(rewards.dtype)


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, **_: object) -> torch.Tensor:
    """REINFORCE leave-one-out advantages [N]: r_i minus the mean of the OTHER group members.

    Equals n/(n-1) * (r_i - group mean); 0 for a group of one.
    """
    mean, count, _ = _group_stats(rewards, group_ids)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), 0.0)
    advantages = torch.where(torch.isnan(rewards), 0.0, (rewards.double() - mean) * scale)
    return advantages.to(rewards.dtype)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": group_advantages,
    "rloo": rloo_advantages,
}


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: e^d - d - 1, d = ref - logp.

    Unbiased for tokens sampled from the policy and always >= 0.
    """
    log_ratio = (ref_logp - logp).clamp(-_KL_LOG_RATIO_CLAMP, _KL_LOG_RATIO_CLAMP)
    return torch.exp(log_ratio) - log_ratio - 1


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

    Metrics (floats, each normalised by the same `token_count`, so they also add up across
    ranks): `pg_loss` (the clipped-surrogate part), `kl` (mean k3), `clip_frac` (share of
    tokens where the clipped term is the active one), `ratio_mean`.
    """
    if not (logp.shape == old_logp.shape == ref_logp.shape == mask.shape):
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, ref_logp "
            f"{tuple(ref_logp.shape)} and mask {tuple(mask.shape)} must have the same shape"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B={logp.shape[0]}]")
    keep = mask.bool()
    weight = keep.to(logp.dtype)
    count = float(weight.sum()) if token_count is None else float(token_count)
    count = max(count, 1.0)  # an all-masked batch gives loss 0, not NaN
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [B, 1]
    # NOTE: masked positions are zeroed before exp() so padding cannot overflow the ratio.
    ratio = torch.exp(torch.where(keep, logp - old_logp, 0.0))
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    pg = -torch.minimum(unclipped, clipped)  # [B, T]
    kl = kl_k3(logp, ref_logp)
    per_token = pg + kl_coef * kl if kl_coef else pg
    loss = torch.where(keep, per_token, 0.0).sum() / count
    with torch.no_grad():
        metrics = {
            "pg_loss": float(torch.where(keep, pg, 0.0).sum() / count),
            "kl": float(torch.where(keep, kl, 0.0).sum() / count),
            "clip_frac": float(((clipped < unclipped) & keep).to(logp.dtype).sum() / count),
            "ratio_mean": float(torch.where(keep, ratio, 0.0).sum() / count),
        }
    return loss, metrics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of the masked tokens (supervised warm-up)."""
    keep = mask.bool()
    return -torch.where(keep, logp, 0.0).sum() / keep.sum().clamp(min=1)
