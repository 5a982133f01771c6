"""One OnlineDPO update: the step's sampled groups judged, (best, worst) pairs, a DPO step.

OnlineDPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback";
TRL's OnlineDPOTrainer) is GRPO's pipeline with another update: the generators sample
`samples_per_prompt` >= 2 completions of each prompt with the current policy and score
them with the reward functions, exactly as for GRPO (same shards, same weight sync); the
trainer then pairs, per prompt, the best-scored completion (chosen) with the worst
(rejected), drops prompts whose completions all score the same (no preference), and takes
one DPO step (`hpcalign.algorithms.dpo_loss`) against the frozen reference.

Every loss and metric is divided by the step's global pair count (over data-parallel
ranks), so micro-batches and ranks add up to the step's means, as in `grpo_update`.
"""

from __future__ import annotations

import numpy as np
import torch

from hpcalign.engines import TrainingEngine, TrainStepResult


def preference_pairs(rewards: torch.Tensor, group_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(chosen index, rejected index) per group with a preference, in first-seen group order.

    Chosen: the highest reward (the first on ties); rejected: the lowest (the first on
    ties). NaN rewards (not scored) take no part; a group whose scored rewards are all
    equal, or that has fewer than two, gives no pair.
    """
    pairs = []
    seen: dict[int, list[int]] = {}
    for i, group in enumerate(group_ids.tolist()):
        seen.setdefault(int(group), []).append(i)
    for members in seen.values():
        scored = [i for i in members if not torch.isnan(rewards[i])]
        if len(scored) < 2:
            continue
        values = [float(rewards[i]) for i in scored]
        best, worst = max(values), min(values)
        if best == worst:
            continue
        pairs.append((scored[values.index(best)], scored[values.index(worst)]))
    return pairs


def online_dpo_update(policy: TrainingEngine, reference: TrainingEngine,
                      prompts: list[np.ndarray], completions: list[np.ndarray],
                      pairs: list[tuple[int, int]], global_pairs: int, *, beta: float,
                      loss_type: str, label_smoothing: float,
                      temperature: float) -> TrainStepResult:
    """One DPO optimizer step over this rank's `pairs` (indices into its samples).

    `global_pairs`: the step's pairs over every data-parallel rank (> 0).
    """
    from hpcalign.algorithms import dpo_implicit_rewards, dpo_loss
    from hpcalign.flows.dpo import preference_scores, sequence_logps

    if not pairs:  # this rank has none, others do: a zero-gradient step keeps the all-reduce
        batch = policy.pack([prompts[0]], [completions[0]])

        def no_pairs(_index: int, _packed: dict, logp: torch.Tensor,
                     _entropy: object) -> tuple[torch.Tensor, dict[str, float]]:
            return logp.sum() * 0.0, {"pairs": 0.0}

        return policy.train_step([batch], no_pairs, temperature=temperature)
    chosen = [completions[c] for c, _ in pairs]
    rejected = [completions[r] for _, r in pairs]
    pair_prompts = [prompts[c] for c, _ in pairs]
    batch = policy.pack(pair_prompts + pair_prompts, chosen + rejected)
    half = len(pairs)
    ref_total, ref_tokens = sequence_logps(reference.logprobs(batch, temperature=temperature)[0],
                                           batch["completion_mask"])
    ref_total, ref_tokens = ref_total.double(), ref_tokens.double()

    def loss_fn(_index: int, packed: dict[str, torch.Tensor], logp: torch.Tensor,
                _entropy: object) -> tuple[torch.Tensor, dict[str, float]]:
        total, tokens = sequence_logps(logp, packed["completion_mask"])
        total, tokens = total.double(), tokens.double()
        losses = dpo_loss(preference_scores(total[:half], tokens[:half], loss_type),
                          preference_scores(total[half:], tokens[half:], loss_type),
                          preference_scores(ref_total[:half], ref_tokens[:half], loss_type),
                          preference_scores(ref_total[half:], ref_tokens[half:], loss_type),
                          beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        with torch.no_grad():
            reward_c = dpo_implicit_rewards(total[:half], ref_total[:half], beta)
            reward_r = dpo_implicit_rewards(total[half:], ref_total[half:], beta)
            share = 1.0 / global_pairs
            metrics = {"dpo_loss": float(losses.sum()) * share,
                       "rewards_chosen": float(reward_c.sum()) * share,
                       "rewards_rejected": float(reward_r.sum()) * share,
                       "reward_margin": float((reward_c - reward_r).sum()) * share,
                       "preference_accuracy": float((reward_c > reward_r).double().sum()) * share,
                       "pairs": float(half)}
        return (losses.sum() / global_pairs).float(), metrics

    return policy.train_step([batch], loss_fn, temperature=temperature)
