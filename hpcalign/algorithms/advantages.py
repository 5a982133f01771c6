"""Advantage estimators as pure tensor functions, registered by name (verl's register_adv_est).

Every estimator in `ADVANTAGE_ESTIMATORS` takes the same arguments, so a flow can pick one
from the config and call it without knowing which it is:

    advantages = ADVANTAGE_ESTIMATORS[name](rewards, group_ids, mask=mask,
                                            token_rewards=token_rewards)

- `rewards` [N] float: one outcome reward per completion; NaN = unscorable (no reward
  function applied): such a sample gets advantage 0 and is left out of every statistic.
- `group_ids` [N] int: equal id = completions of the same prompt (members need not be
  contiguous).
- `mask` [N, T] (optional for the outcome estimators): 1 on a completion's tokens. Masked
  positions may sit anywhere (right padding, holes); they never contribute.
- `token_rewards` [N, T] (optional): per-token rewards on top of the outcome, e.g. the KL
  penalty -beta * KL_t when the KL term is in the reward rather than in the loss.
- Returns [N] (one advantage for every token of a completion: grpo, rloo) or [N, T]
  (token-level: reinforce_pp, reinforce_pp_baseline; 0 at masked positions).

Choices (written here so the trainer and tests agree):
- Group std is the unbiased (Bessel, n - 1) sample std, `torch.std`'s default and what the
  reference implementations of DeepSeekMath's GRPO (TRL's GRPOTrainer, verl's
  `compute_grpo_outcome_advantage`) use; the paper writes std(r) without saying which.
- A group of one has no baseline to compare with: its group-relative advantage is 0 (verl
  instead uses the raw reward there, which is not group-relative).
- With `token_rewards`, the outcome estimators normalise the sequence return
  R + sum_t token_rewards_t (gamma = 1), as verl does with `token_level_rewards.sum(-1)`.
- Batch whitening (REINFORCE++) uses verl's `masked_whiten`: mean and unbiased variance
  over every valid token of the batch, (x - mean) * rsqrt(var + eps).

`gae` and `whiten` are here too: token-level tools for flows with a value model (PPO).
Computations run in float64 and come back in the rewards' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

AdvantageEstimator = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: add an estimator to `ADVANTAGE_ESTIMATORS` under `name` (unique)."""

    def register(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


def _group_stats(
    rewards: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element group mean, group size and sum of squared deviations (all [N], float64).

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


def _check_tokens(rewards: torch.Tensor, mask: torch.Tensor | None,
                  token_rewards: torch.Tensor | None, *, need_mask: bool) -> torch.Tensor | None:
    """The boolean [N, T] mask after shape checks (None when neither is given)."""
    if mask is None:
        if need_mask:
            raise ValueError("this estimator is token-level: pass mask [N, T]")
        if token_rewards is not None:
            raise ValueError("token_rewards [N, T] needs the mask [N, T] of the completion tokens")
        return None
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask {tuple(mask.shape)} must be [N={rewards.shape[0]}, T]")
    if token_rewards is not None and token_rewards.shape != mask.shape:
        raise ValueError(f"token_rewards {tuple(token_rewards.shape)} must have the mask's "
                         f"shape {tuple(mask.shape)}")
    return mask.bool()


def _sequence_returns(rewards: torch.Tensor, mask: torch.Tensor | None,
                      token_rewards: torch.Tensor | None) -> torch.Tensor:
    """R + sum of the masked token rewards (gamma = 1); the rewards themselves without them."""
    keep = _check_tokens(rewards, mask, token_rewards, need_mask=False)
    if token_rewards is None or keep is None:
        return rewards
    return rewards.double() + torch.where(keep, token_rewards.double(), 0.0).sum(-1)


@register_advantage_estimator("grpo")
def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
    mask: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO advantages [N]: (r - group mean) / (unbiased group std + eps).

    DeepSeekMath (Shao et al. 2024, arXiv:2402.03300) §4.1.2, outcome supervision:
    A_i = (r_i - mean(r)) / std(r) over the G completions of one prompt, given to every
    token of completion i. `scale_by_std=False` only subtracts the mean (Dr. GRPO, Liu et
    al. 2025, arXiv:2503.20783 §3.1: the std division biases towards too easy/hard
    prompts). A NaN reward gets advantage 0 and is left out of its group's mean and std,
    as in TRL's GRPOTrainer. With `token_rewards`, r_i is the return R_i + sum_t r_{i,t}.
    """
    returns = _sequence_returns(rewards, mask, token_rewards)
    mean, count, sq_dev = _group_stats(returns, group_ids)
    advantages = returns.double() - mean
    if scale_by_std:
        std = torch.where(count > 1, sq_dev / (count - 1).clamp(min=1), 0.0).sqrt()
        advantages = advantages / (std + eps)
    advantages = torch.where(torch.isnan(returns), 0.0, advantages)
    return advantages.to(rewards.dtype)


@register_advantage_estimator("rloo")
def rloo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE leave-one-out advantages [N]: r_i minus the mean of the OTHER group members.

    Ahmadian et al. 2024 (arXiv:2402.14740) eq. 7 (Kool et al. 2019):
    A_i = r_i - 1/(k-1) sum_{j != i} r_j = k/(k-1) * (r_i - mean(r)); 0 for a group of
    one. NaN rewards as in `group_advantages`.
    """
    returns = _sequence_returns(rewards, mask, token_rewards)
    mean, count, _ = _group_stats(returns, group_ids)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), 0.0)
    advantages = torch.where(torch.isnan(returns), 0.0, (returns.double() - mean) * scale)
    return advantages.to(rewards.dtype)


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
           eps: float = 1e-8, group: Any = None) -> torch.Tensor:
    """Masked whitening [N, T]: (x - mean) * rsqrt(var + eps) over the masked entries.

    Mean and unbiased variance over every entry where `mask` is set (verl's
    `masked_whiten`); fewer than two entries count as variance 0. `shift_mean=False` adds
    the mean back (scale only). Masked-out entries come back as 0. With a torch.distributed
    `group` (data-parallel replicas, each holding some rows of one batch) the mean and
    variance are the whole batch's: every replica whitens its rows as one process would.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    keep = mask.bool()
    x = torch.where(keep, values.double(), 0.0)
    sums = torch.stack([keep.sum().double(), x.sum()])
    if group is not None:
        dist.all_reduce(sums, group=group)
    n = sums[0]
    mean = sums[1] / n.clamp(min=1)
    squares = torch.where(keep, x - mean, 0.0).pow(2).sum()
    if group is not None:
        dist.all_reduce(squares, group=group)
    var = squares / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, 0.0).to(values.dtype)


def _returns_to_go(outcome: torch.Tensor, keep: torch.Tensor, token_rewards: torch.Tensor | None,
                   gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t, valid} gamma^(#valid steps from t to s) r_s, float64 [N, T];
    r_s = token reward + the outcome on the last valid token. Masked positions are skipped
    (they neither add a reward nor discount) and hold 0."""
    n, length = keep.shape
    rewards = torch.zeros(n, length, dtype=torch.float64)
    if not keep.any():  # an empty batch, or no valid token: nothing to return
        return rewards
    if token_rewards is not None:
        rewards = torch.where(keep, token_rewards.double(), 0.0)
    has_token = keep.any(-1)
    last = length - 1 - keep.flip(-1).int().argmax(-1)  # the last valid position of a row
    rows = torch.nonzero(has_token).squeeze(-1)
    rewards[rows, last[rows]] += outcome.double()[rows]
    returns = torch.zeros_like(rewards)
    running = torch.zeros(n, dtype=torch.float64)
    for t in reversed(range(length)):
        running = torch.where(keep[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(keep[:, t], running, 0.0)
    return returns


@register_advantage_estimator("reinforce_pp")
def reinforce_pp_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ advantages [N, T]: returns-to-go, whitened over the whole batch.

    Hu 2025 (arXiv:2501.03262) §3: r_t = 1[t = EOS] r(x, y) - beta KL_t,
    A_t = sum_{s >= t} gamma^(s - t) r_s (eq. for gamma = 1: r(x, y) - beta sum_{s>=t} KL_s),
    then A_norm = (A - mean_batch A) / std_batch A over every token of the batch.
    `token_rewards` carries -beta KL_t (or nothing: KL in the loss). `group_ids` is
    unused (REINFORCE++ has no group baseline) and kept for the common signature.
    Unscored samples (NaN) get 0 and leave the batch statistics.
    """
    keep = _check_tokens(rewards, mask, token_rewards, need_mask=True)
    assert keep is not None  # need_mask
    scored = ~torch.isnan(rewards)
    keep = keep & scored.unsqueeze(-1)
    outcome = torch.where(scored, rewards.double(), 0.0)
    returns = _returns_to_go(outcome, keep, token_rewards, gamma)
    return whiten(returns, keep, eps=eps).to(rewards.dtype)


@register_advantage_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++-baseline advantages [N, T]: group-mean baseline, then batch whitening.

    Hu 2025 (arXiv:2501.03262, v3+) eq. for REINFORCE++-baseline:
    A'_{q,o_t} = r(o, q) - mean_{group of q}(r), A_norm = (A' - mean_batch A') / std_batch A'.
    With `token_rewards` (KL in the reward) A'_t adds sum_{s >= t} r_s, as OpenRLHF does
    (baseline subtracted from the outcome, then returns-to-go). A group of one has
    baseline = its own reward (A' = 0 before whitening); NaN rewards as elsewhere.
    """
    mean, _, _ = _group_stats(rewards, group_ids)
    centred = (rewards.double() - mean).to(rewards.dtype)  # NaN stays NaN
    return reinforce_pp_advantages(centred, group_ids, mask=mask, token_rewards=token_rewards,
                                   gamma=1.0, eps=eps)


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: (advantages, returns), both [N, T], raw.

    Schulman et al. 2016 (arXiv:1506.02438) eq. 16: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = sum_l (gamma lam)^l delta_{t+l}, with V = 0 after the last valid token; returns
    = A + V (the value target). Masked positions are skipped (verl's
    `compute_gae_advantage_return`: the next valid token's value and advantage carry across
    them) and come back as 0 in both. No whitening here: call `whiten` for that.
    """
    if not (token_rewards.shape == values.shape == mask.shape) or token_rewards.dim() != 2:
        raise ValueError(f"token_rewards {tuple(token_rewards.shape)}, values "
                         f"{tuple(values.shape)} and mask {tuple(mask.shape)} must be equal [N, T]")
    keep = mask.bool()
    rewards, v = token_rewards.double(), values.double()
    n, length = keep.shape
    advantages = torch.zeros(n, length, dtype=torch.float64)
    next_value = torch.zeros(n, dtype=torch.float64)
    last_gae = torch.zeros(n, dtype=torch.float64)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - v[:, t]
        current = delta + gamma * lam * last_gae
        next_value = torch.where(keep[:, t], v[:, t], next_value)
        last_gae = torch.where(keep[:, t], current, last_gae)
        advantages[:, t] = torch.where(keep[:, t], current, 0.0)
    returns = torch.where(keep, advantages + v, 0.0)
    return advantages.to(token_rewards.dtype), returns.to(token_rewards.dtype)


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Bool [N]: the sample's group has two scored rewards that differ.

    DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476 eq. 11: keep groups with
    0 < #correct < G) generalised to any reward: a group whose scored rewards are all equal
    (or that has fewer than two) carries no group-relative signal. Equality is exact
    (max == min), not a variance below some epsilon. NaN rewards are ignored.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids "
                         f"{tuple(group_ids.shape)} must be equal-length 1-D tensors")
    scored = ~torch.isnan(rewards)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    values = rewards.double()[scored]
    high = torch.full((n_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse[scored], values, "amax")
    low = torch.full((n_groups,), torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse[scored], values, "amin")
    return (high > low)[inverse]
