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
from typing import Any

import numpy as np
import torch
import torch.distributed

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
    rows = int((mask.bool().sum(dim=1) > 0).sum())
    return _sample_kl_sum(logp, ref_logp, mask) / rows if rows else 0.0


def _sample_kl_sum(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """The sum over samples (with completion tokens) of their token-mean k1 KL."""
    keep = mask.bool()
    counts = keep.sum(dim=1)
    rows = counts > 0
    per_sample = torch.where(keep, logp - ref_logp, 0.0).double().sum(dim=1)[rows] / counts[rows]
    return float(per_sample.sum())


def _old_logp(batch: dict[str, torch.Tensor], prompts: list[np.ndarray],
              old_logprobs: list[np.ndarray]) -> torch.Tensor:
    """The generator's per-token log-probs laid out like the packed batch [B, T]."""
    old = torch.zeros(batch["completion_mask"].shape, dtype=torch.float32)
    for row, (prompt, values) in enumerate(zip(prompts, old_logprobs)):
        old[row, len(prompt):len(prompt) + len(values)] = torch.from_numpy(
            np.asarray(values, np.float32))
    return old.to(batch["completion_mask"].device)


@dataclass(frozen=True)
class Replicas:
    """The data-parallel replicas sharing one PPO update: replica r holds rows `shares[r]`
    of the step's batch (every rank knows every share), this rank is replica `index`, and
    `group` sums over the replicas (None: one replica)."""

    shares: tuple[np.ndarray, ...]
    index: int = 0
    group: Any = None

    @classmethod
    def single(cls, n: int) -> Replicas:
        return cls((np.arange(n),))


def minibatch_plan(lengths: np.ndarray, replicas: Replicas, settings: PPOSettings,
                   step: int) -> list[tuple[np.ndarray, float]]:
    """Every PPO update of a step, in order: (this replica's rows, as positions in its
    share, sorted; the completion tokens of the whole minibatch over all replicas).

    Each epoch every replica shuffles its own share (seeded by the run's seed, the step
    and, with several replicas, the replica) and splits it into `minibatches` chunks;
    minibatch k is chunk k of every replica (verl's data-parallel PPO). With one replica
    that is one shuffle of the batch, and the minibatch of a single trainer. Every rank
    computes every replica's chunks, so the token counts need no communication.
    """
    several = len(replicas.shares) > 1
    rngs = [np.random.default_rng(np.random.SeedSequence(
                [settings.seed, step, *([r] if several else [])]))
            for r in range(len(replicas.shares))]
    plan = []
    for _ in range(settings.epochs):
        chunks = [np.array_split(rng.permutation(len(share)), settings.minibatches)
                  for rng, share in zip(rngs, replicas.shares)]
        for k in range(settings.minibatches):
            tokens = sum(float(lengths[share[chunk[k]]].sum())
                         for share, chunk in zip(replicas.shares, chunks))
            plan.append((np.sort(chunks[replicas.index][k]), tokens))
    return plan


def _batch_means(sums: dict[str, tuple[float, float]], group: Any) -> dict[str, float]:
    """{name: total / count}, both summed over the replicas in one all-reduce."""
    names = sorted(sums)
    values = torch.tensor([sums[k] for k in names], dtype=torch.float64).reshape(-1, 2)
    if group is not None:
        torch.distributed.all_reduce(values, group=group)
    return {k: float(total / count) if count else 0.0
            for k, (total, count) in zip(names, values.tolist())}


def ppo_update(policy: TrainingEngine, reference: TrainingEngine, critic,
               prompts: list[np.ndarray], completions: list[np.ndarray],
               old_logprobs: list[np.ndarray], scores: torch.Tensor, settings: PPOSettings,
               *, temperature: float = 1.0, step: int = 0,
               replicas: Replicas | None = None) -> dict[str, float]:
    """PPO epochs over one rollout batch; the step's metrics (the whole batch's).

    The samples given are this replica's share (`replicas`; default: the whole batch on
    one replica): whitening, token counts and metrics span every replica, and the engines
    sum gradients over them, so N replicas take the steps one trainer would.
    """
    from hpcalign.algorithms import gae, policy_loss, value_loss, whiten

    replicas = replicas or Replicas.single(len(completions))
    batch = policy.pack(prompts, completions)
    mask = batch["completion_mask"]
    old_logp = _old_logp(batch, prompts, old_logprobs)
    ref_logp = reference.logprobs(batch, temperature=temperature)[0]
    old_values = critic.values(batch)
    rewards = token_rewards(scores.to(mask.device), old_logp, ref_logp, mask, settings.kl_coef)
    advantages, returns = gae(rewards, old_values.double(), mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = whiten(advantages, mask, group=replicas.group)
    advantages, returns = advantages.float(), returns.float()
    lengths = np.zeros(sum(len(share) for share in replicas.shares), dtype=np.int64)
    lengths[replicas.shares[replicas.index]] = [len(c) for c in completions]
    if replicas.group is not None:  # the other replicas' lengths: from their shards
        gathered = torch.from_numpy(lengths)
        torch.distributed.all_reduce(gathered, group=replicas.group)
        lengths = gathered.numpy()
    totals: dict[str, float] = {}
    plan = minibatch_plan(lengths, replicas, settings, step)
    for local_rows, count in plan:
        rows = torch.from_numpy(local_rows)
        mb = {key: value[rows] for key, value in batch.items()}
        mb_mask = mb["completion_mask"]

        def actor_loss(_i, _b, logp, _e, rows=rows, mb_mask=mb_mask, count=count):
            return policy_loss(logp, old_logp[rows], advantages[rows], mb_mask,
                               clip_eps_low=settings.clip_eps, ref_logp=ref_logp[rows],
                               token_count=count)

        def critic_loss(_i, _b, values, rows=rows, mb_mask=mb_mask, count=count):
            return value_loss(values, old_values[rows], returns[rows], mb_mask,
                              clip_eps=settings.value_clip_eps, token_count=count)

        actor = policy.train_step([mb], actor_loss, temperature=temperature)
        value = critic.train_step([mb], critic_loss)
        for key, v in {**actor.metrics, **value.metrics}.items():
            totals[key] = totals.get(key, 0.0) + v
    metrics = {key: v / max(len(plan), 1) for key, v in totals.items()}
    keep = mask.bool()
    has_tokens = keep.sum(dim=1) > 0
    metrics.update(_batch_means({
        "score_mean": (float(scores.double().sum()), float(len(completions))),
        "kl_k1": (float((old_logp - ref_logp)[keep].double().sum()), float(keep.sum())),
        "kl_sample_mean": (_sample_kl_sum(old_logp, ref_logp, mask), float(has_tokens.sum())),
        "value_mean": (float(old_values[keep].double().sum()), float(keep.sum())),
    }, replicas.group))
    peak = advantages[keep].abs().max() if keep.any() else torch.zeros(())
    peak = peak.double().reshape(1)
    if replicas.group is not None:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX,
                                     group=replicas.group)
    metrics.update(advantage_raw_max=float(peak), ppo_updates=float(len(plan)))
    return metrics
