"""Policy, value, KL and SFT losses as pure tensor functions over [B, T] token grids.

Shapes and masks (every function): `logp`, `old_logp`, `ref_logp`, `mask` are [B, T]; the
mask is 1 on the tokens that count (a completion's), anywhere in the row (the trainer's
packed rows hold the prompt first). Masked positions never contribute to a loss, a metric
or a gradient, whatever they hold (padding may be garbage: it is zeroed before exp()).

Aggregation (`aggregate`, verl's `agg_loss` names) turns per-token losses into one number:
- `token-mean`: sum over every valid token / number of valid tokens (DAPO, Yu et al. 2025,
  arXiv:2503.14476 eq. 12: long completions are not down-weighted);
- `seq-mean-token-mean`: mean over sequences of each sequence's token mean (the original
  GRPO objective, DeepSeekMath eq. 3; GSPO's);
- `seq-mean-token-sum`: mean over sequences of each sequence's token sum;
- `seq-mean-token-sum-norm`: sum over every token / (sequences x a constant length), Dr.
  GRPO's constant normaliser (Liu et al. 2025, arXiv:2503.20783 §3.1; TRL's `dr_grpo`
  divides by batch size x max_completion_length).
Data-parallel and micro-batched callers pass the GLOBAL `token_count` / `seq_count` so each
part's loss is its share of the step's value and the parts add up.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                      "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm")
KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")

# log-ratios are clamped to +-20 inside k3 so exp() cannot overflow on a far-off token
_KL_LOG_RATIO_CLAMP = 20.0


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: e^d - d - 1, d = ref - logp.

    Unbiased for tokens sampled from the policy and always >= 0.
    """
    log_ratio = (ref_logp - logp).clamp(-_KL_LOG_RATIO_CLAMP, _KL_LOG_RATIO_CLAMP)
    return torch.exp(log_ratio) - log_ratio - 1


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor,
                kind: KLEstimator | str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens' log-probs.

    Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html),
    with r = pi_ref / pi = exp(ref_logp - logp):
    k1 = -log r (unbiased, can be negative, high variance), k2 = (log r)^2 / 2 (biased, low
    variance; its gradient is that of KL's), k3 = (r - 1) - log r (unbiased, >= 0; the log
    ratio is clamped to +-20 before exp()). Same shape as the inputs.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl estimator {kind!r} is not one of: {', '.join(KL_ESTIMATORS)}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: Aggregation | str = "token-mean",
              *, token_count: float | None = None, seq_count: float | None = None,
              norm_length: float | None = None) -> torch.Tensor:
    """One scalar from per-token values [B, T] under `mask` (see the module docstring).

    `token_count` defaults to the mask's sum, `seq_count` to the rows with at least one
    valid token, `norm_length` (seq-mean-token-sum-norm) to T. Counts below 1 count as 1,
    so an all-masked (or empty) batch gives 0, not NaN.
    """
    keep = mask.bool()
    values = torch.where(keep, per_token, 0.0)
    if mode == "token-mean":
        count = float(keep.sum()) if token_count is None else float(token_count)
        return values.sum() / max(count, 1.0)
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation {mode!r} is not one of: {', '.join(AGGREGATIONS)}")
    seqs = float(keep.any(-1).sum()) if seq_count is None else float(seq_count)
    seqs = max(seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return values.sum(-1).sum() / seqs
    if mode == "seq-mean-token-mean":
        lengths = keep.sum(-1).clamp(min=1).to(values.dtype)
        return (values.sum(-1) / lengths).sum() / seqs
    length = float(mask.shape[-1]) if norm_length is None else float(norm_length)
    return values.sum() / (seqs * max(length, 1.0))


def _check_shapes(logp: torch.Tensor, others: dict[str, torch.Tensor | None],
                  advantages: torch.Tensor) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != logp.shape:
            raise ValueError(f"logp {tuple(logp.shape)} and {name} {tuple(tensor.shape)} must "
                             "have the same shape")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B={logp.shape[0]}] "
                         f"or [B, T]={tuple(logp.shape)}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: Aggregation | str = "token-mean",
    importance_ratio: Literal["token", "sequence"] | str = "token",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator | str = "k3",
    token_count: float | None = None,
    seq_count: float | None = None,
    norm_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (+ kl_coef * KL to a reference), aggregated: (loss, metrics).

    Per token (PPO, Schulman et al. 2017, arXiv:1707.06347 eq. 7; GRPO eq. 3):
    l_t = -min(w_t A_t, clip(w_t, 1 - clip_eps_low, 1 + clip_eps_high) A_t) + kl_coef KL_t,
    then `aggregate`d. `clip_eps_high` > `clip_eps_low` is DAPO's clip-higher (arXiv:
    2503.14476 eq. 10); None = symmetric. `importance_ratio`:
    - `token`: w_t = pi(y_t) / pi_old(y_t);
    - `sequence`: GSPO (Zheng et al. 2025, arXiv:2507.18071 eq. 7 and GSPO-token eq. 13):
      every token of sequence i has the value s_i = exp(mean_t log(pi/pi_old)) and the
      gradient s_i * grad log pi(y_t): with `seq-mean-token-mean` and one advantage per
      sequence this is GSPO's objective exactly (value and gradient).
    `advantages` [B] (one per sequence) or [B, T] (token-level, e.g. REINFORCE++). `ref_logp`
    is needed for the KL (metric, and the loss term when kl_coef > 0).

    Metrics (floats): `pg_loss` (the surrogate part, aggregated like the loss), and token
    means over `token_count` (so they add up over micro-batches and ranks): `kl` (of the
    chosen estimator; 0 without ref_logp), `clip_frac` (tokens where the clipped term is the
    active one), `ratio_mean`.
    """
    _check_shapes(logp, {"old_logp": old_logp, "ref_logp": ref_logp, "mask": mask}, advantages)
    if kl_coef and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp")
    if importance_ratio not in ("token", "sequence"):
        raise ValueError(f"importance_ratio {importance_ratio!r} is not one of: token, sequence")
    high = clip_eps_low if clip_eps_high is None else clip_eps_high
    keep = mask.bool()
    weight = keep.to(logp.dtype)
    count = float(weight.sum()) if token_count is None else float(token_count)
    count = max(count, 1.0)  # an all-masked batch gives loss 0, not NaN
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # [B, 1] or [B, T]
    # NOTE: masked positions are zeroed before exp() so padding cannot overflow the ratio.
    log_ratio = torch.where(keep, logp - old_logp, 0.0)
    if importance_ratio == "sequence":
        seq_mean = log_ratio.sum(-1) / weight.sum(-1).clamp(min=1)  # [B]
        log_ratio = torch.where(keep, logp - logp.detach() + seq_mean.detach().unsqueeze(1), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + high) * adv
    pg = -torch.minimum(unclipped, clipped)  # [B, T]
    kl = kl_estimate(logp, ref_logp, kl_estimator) if ref_logp is not None else None
    per_token = pg + kl_coef * kl if (kl_coef and kl is not None) else pg
    counts = {"token_count": token_count, "seq_count": seq_count, "norm_length": norm_length}
    if aggregation == "token-mean":  # the GRPO default: exactly the pre-split arithmetic
        loss = torch.where(keep, per_token, 0.0).sum() / count
        pg_part = torch.where(keep, pg, 0.0).sum() / count
    else:
        loss = aggregate(per_token, mask, aggregation, **counts)
        pg_part = aggregate(pg, mask, aggregation, **counts)
    with torch.no_grad():
        metrics = {
            "pg_loss": float(pg_part),
            "kl": float(torch.where(keep, kl, 0.0).sum() / count) if kl is not None else 0.0,
            "clip_frac": float(((clipped < unclipped) & keep).to(logp.dtype).sum() / count),
            "ratio_mean": float(torch.where(keep, ratio, 0.0).sum() / count),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = 0.2,
    aggregation: Aggregation | str = "token-mean",
    token_count: float | None = None,
    seq_count: float | None = None,
    norm_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss, all [B, T]: (loss, {vf_loss, vf_clip_frac}).

    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) per token, aggregated
    (PPO as in OpenAI baselines' ppo2 and verl's `compute_value_loss`; arXiv:1707.06347
    §5 names the squared-error value loss). `clip_eps=None`: plain 0.5 * (V - R)^2.
    `vf_clip_frac`: share of tokens (over `token_count`) where the clipped term is larger.
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, "
                         f"returns {tuple(returns.shape)} and mask {tuple(mask.shape)} must have "
                         "the same shape")
    keep = mask.bool()
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        losses, clipped_active = unclipped, torch.zeros_like(keep)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (clipped_values - returns) ** 2
        losses = torch.maximum(unclipped, clipped)
        clipped_active = clipped > unclipped
    loss = 0.5 * aggregate(losses, mask, aggregation, token_count=token_count,
                           seq_count=seq_count, norm_length=norm_length)
    count = max(float(keep.sum()) if token_count is None else float(token_count), 1.0)
    with torch.no_grad():
        metrics = {"vf_loss": float(loss),
                   "vf_clip_frac": float((clipped_active & keep).sum()) / count}
    return loss, metrics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of the masked tokens (supervised warm-up)."""
    keep = mask.bool()
    return -torch.where(keep, logp, 0.0).sum() / keep.sum().clamp(min=1)
