"""One RLHF-PPO update over a rollout batch: policy, reference, reward score and critic.

InstructGPT's PPO (Ouyang et al. 2022; Ziegler et al. 2019), as TRL's PPOTrainer and
verl's RLHF recipe run it:

1. token rewards: -kl_coef * (log pi_old - log pi_ref) per completion token (the k1 KL
   estimate), plus the sequence's score (reward model at the last token, or the reward
   functions) on its last completion token (`token_rewards`);
2. GAE (gamma, lambda) over the critic's values of the rollout (`hpcalign.algorithms.gae`),
   advantages whitened over the batch's completion tokens (`whiten`);
3. `epochs` passes over the batch in `minibatches` seeded shuffles, each minibatch one
   clipped-surrogate step of the policy (`policy_loss`) and one clipped value-loss step of
   the critic (`value_loss`).

Log-probs and values are [B, T] over packed sequences, read through `completion_mask`.

    metrics = ppo_update(policy, reference, critic, prompts, completions, old, scores, settings)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcalign.engines import TrainingEngine


@dataclass(frozen=True, kw_only=True)
class PPOSettings:
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    epochs: int = 2
    minibatches: int = 2
    whiten_advantages: bool = True
    seed: int = 0


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                  mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """[B, T]: -kl_coef * (logp - ref_logp) on completion tokens, + scores[b] on each
    row's last completion token (rows without completion tokens get nothing)."""
    keep = mask.bool()
    rewards = torch.where(keep, -kl_coef * (logp - ref_logp), 0.0).double()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(keep, positions, -1).max(dim=1).values  # [B]
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += scores[rows].double()
    return rewards


def sample_mean_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """k1 KL averaged over each sample's completion tokens, then over the samples that have
    any (verl's measure for the adaptive KL controller); 0.0 for none."""
    keep = mask.bool()
    counts = keep.sum(dim=1)
    rows = counts > 0
    if not rows.any():
        return 0.0
    per_sample = torch.where(keep, logp - ref_logp, 0.0).double().sum(dim=1)[rows] / counts[rows]
    return float(per_sample.mean())


def _old_logp(batch: dict[str, torch.Tensor], prompts: list[np.ndarray],
              old_logprobs: list[np.ndarray]) -> torch.Tensor:
    """The generator's per-token log-probs laid out like the packed batch [B, T]."""
    old = torch.zeros(batch["completion_mask"].shape, dtype=torch.float32)
    for row, (prompt, values) in enumerate(zip(prompts, old_logprobs)):
        old[row, len(prompt):len(prompt) + len(values)] = torch.from_numpy(
            np.asarray(values, np.float32))
    return old.to(batch["completion_mask"].device)


def ppo_update(policy: TrainingEngine, reference: TrainingEngine, critic,
               prompts: list[np.ndarray], completions: list[np.ndarray],
               old_logprobs: list[np.ndarray], scores: torch.Tensor, settings: PPOSettings,
               *, temperature: float = 1.0, step: int = 0) -> dict[str, float]:
    """PPO epochs over one rollout batch (this rank's samples); the step's metrics."""
    from hpcalign.algorithms import gae, policy_loss, value_loss, whiten

    batch = policy.pack(prompts, completions)
    mask = batch["completion_mask"]
    old_logp = _old_logp(batch, prompts, old_logprobs)
    ref_logp = reference.logprobs(batch, temperature=temperature)[0]
    old_values = critic.values(batch)
    rewards = token_rewards(scores.to(mask.device), old_logp, ref_logp, mask, settings.kl_coef)
    advantages, returns = gae(rewards, old_values.double(), mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = whiten(advantages, mask)
    advantages, returns = advantages.float(), returns.float()
    n = len(completions)
    size = max(1, -(-n // settings.minibatches))
    generator = np.random.default_rng(np.random.SeedSequence([settings.seed, step]))
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(settings.epochs):
        order = generator.permutation(n)
        for first in range(0, n, size):
            rows = torch.from_numpy(np.sort(order[first:first + size]))
            mb = {key: value[rows] for key, value in batch.items()}
            mb_mask = mb["completion_mask"]
            count = float(mb_mask.sum())

            def actor_loss(_i, _b, logp, _e, rows=rows, mb_mask=mb_mask, count=count):
                return policy_loss(logp, old_logp[rows], advantages[rows], mb_mask,
                                   clip_eps_low=settings.clip_eps, ref_logp=ref_logp[rows],
                                   token_count=count)

            def critic_loss(_i, _b, values, rows=rows, mb_mask=mb_mask, count=count):
                return value_loss(values, old_values[rows], returns[rows], mb_mask,
                                  clip_eps=settings.value_clip_eps, token_count=count)

            actor = policy.train_step([mb], actor_loss, temperature=temperature)
            value = critic.train_step([mb], critic_loss)
            updates += 1
            for key, v in {**actor.metrics, **value.metrics}.items():
                totals[key] = totals.get(key, 0.0) + v
    metrics = {key: v / max(updates, 1) for key, v in totals.items()}
    keep = mask.bool()
    metrics.update(score_mean=float(scores.float().mean()),
                   kl_k1=float(((old_logp - ref_logp)[keep]).mean()) if keep.any() else 0.0,
                   kl_sample_mean=sample_mean_kl(old_logp, ref_logp, mask),
                   advantage_raw_max=float(advantages[keep].abs().max()) if keep.any() else 0.0,
                   value_mean=float(old_values[keep].mean()) if keep.any() else 0.0,
                   ppo_updates=float(updates))
    return metrics
