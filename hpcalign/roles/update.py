"""One GRPO update through a training engine, and the reward metrics of a step's shards.

`grpo_update` is the trainer's step minus the control flow: micro-batches packed by the
policy engine, reference log-probs from the frozen engine, and a loss function that
`TrainingEngine.train_step` runs per micro-batch (gradient accumulation, the data-parallel
all-reduce, clipping and the AdamW step are the engine's). Every loss and metric is
normalised by the step's global completion-token count, so micro-batches and ranks add up
to the step's token means (`pg_loss` and `clip_frac` included: `policy_loss` already divides
by that count, nothing may scale them again). `prepare_update` + `run_update` are the two
halves (the trainer computes advantages in between, e.g. with the KL in the reward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from hpcalign.algorithms.advantages import ADVANTAGE_ESTIMATORS
from hpcalign.algorithms.losses import kl_estimate, policy_loss
from hpcalign.config.schema import TrainerConfig
from hpcalign.data.shards import RolloutBatch
from hpcalign.engines import TrainingEngine, TrainStepResult


@dataclass
class UpdateBatch:
    """This rank's samples packed for the update: per micro-batch the packed tensors, the
    sample rows it holds, the generator's log-probs (`old_of`), the ratio's denominators
    (`prox_of`: `old_of`, or the trainer's own log-probs when trainer.updates_per_batch > 1)
    and the reference log-probs, all [b, T] in the packed layout (prompt first)."""

    micro_batches: list[dict[str, torch.Tensor]]
    rows_of: list[torch.Tensor]
    old_of: list[torch.Tensor]
    prox_of: list[torch.Tensor]
    ref_of: list[torch.Tensor]
    prompt_lens: list[int]
    completion_lens: list[int]

    def completion_values(self, per_micro: list[torch.Tensor]) -> list[np.ndarray]:
        """Packed [b, T] values -> one completion-aligned array per sample, in sample order."""
        out: list[np.ndarray] = []
        for values, rows in zip(per_micro, self.rows_of, strict=True):
            for row, i in enumerate(rows.tolist()):
                start = self.prompt_lens[i]
                out.append(values[row, start:start + self.completion_lens[i]].cpu().numpy())
        return out

    def token_kl(self, kind: str) -> list[np.ndarray]:
        """Per-token KL(ratio's policy || reference) of each sample (KL in the reward)."""
        pairs = zip(self.prox_of, self.ref_of, strict=True)
        return self.completion_values([kl_estimate(prox, ref, kind) for prox, ref in pairs])


def prepare_update(policy: TrainingEngine, reference: TrainingEngine,
                   prompts: list[np.ndarray], completions: list[np.ndarray],
                   old_logprobs: list[np.ndarray], tcfg: TrainerConfig, *,
                   temperature: float) -> UpdateBatch:
    """Pack this rank's samples in micro-batches of `tcfg.micro_batch`; reference (and, for
    several updates per batch, the trainer's old) log-probs without gradients."""
    micro = tcfg.micro_batch or max(1, len(completions))
    micro_batches, rows_of, old_of, prox_of, ref_of = [], [], [], [], []
    for first in range(0, len(completions), micro):
        rows = np.arange(first, min(first + micro, len(completions)))
        batch = policy.pack([prompts[i] for i in rows], [completions[i] for i in rows])
        mask = batch["completion_mask"]
        old_logp = torch.zeros(mask.shape, dtype=torch.float32)
        for row, i in enumerate(rows):
            start = len(prompts[i])
            old_logp[row, start:start + len(old_logprobs[i])] = torch.from_numpy(
                old_logprobs[i].astype(np.float32))
        micro_batches.append(batch)
        rows_of.append(torch.from_numpy(rows))
        old_of.append(old_logp.to(policy.device))
        # NOTE: with several updates the ratio must start at 1 for the trainer's own
        # numbers (the generator's differ slightly), so its denominator is the trainer's
        prox_of.append(policy.logprobs(batch, temperature=temperature)[0]
                       if tcfg.updates_per_batch > 1 else old_of[-1])
        ref_of.append(reference.logprobs(batch, temperature=temperature)[0])
    return UpdateBatch(micro_batches, rows_of, old_of, prox_of, ref_of,
                       [len(p) for p in prompts], [len(c) for c in completions])


def _packed_advantages(prepared: UpdateBatch, advantages: torch.Tensor) -> list[torch.Tensor]:
    """Per micro-batch: [b] for sequence-level advantages, [b, T] (packed) for token-level
    ones given completion-aligned as [n, T_completion]."""
    if advantages.dim() == 1:
        return [advantages[rows] for rows in prepared.rows_of]
    out = []
    for batch, rows in zip(prepared.micro_batches, prepared.rows_of, strict=True):
        packed = torch.zeros(batch["completion_mask"].shape, dtype=advantages.dtype,
                             device=advantages.device)
        for row, i in enumerate(rows.tolist()):
            start, length = prepared.prompt_lens[i], prepared.completion_lens[i]
            packed[row, start:start + length] = advantages[i, :length]
        out.append(packed)
    return out


def run_update(policy: TrainingEngine, prepared: UpdateBatch, advantages: torch.Tensor,
               token_count: float, tcfg: TrainerConfig, *, temperature: float,
               seq_count: float | None = None, norm_length: float | None = None,
               after_backward: Callable[[], None] | None = None) -> TrainStepResult:
    """`tcfg.updates_per_batch` optimizer steps on the prepared samples (GRPO family options).

    `advantages` [n] or [n, T_completion] on the policy's device; `token_count` and
    `seq_count` (default: this rank's samples) are the completion tokens and samples of the
    whole step over every data-parallel rank, so each micro-batch's loss and metrics are its
    share of the step's value and add up (in `train_step`). `norm_length` is the constant of
    seq-mean-token-sum-norm (the trainer passes generator.max_new_tokens). With several
    updates the metrics and grad norm are the means over them.
    """
    micro_batches, rows_of, ref_of = prepared.micro_batches, prepared.rows_of, prepared.ref_of
    prox_of = prepared.prox_of
    adv_of = _packed_advantages(prepared, advantages)
    seq_count = float(sum(len(r) for r in rows_of)) if seq_count is None else seq_count
    if norm_length is None:
        norm_length = float(max(prepared.completion_lens, default=1))
    low = tcfg.clip_eps if tcfg.clip_eps_low is None else tcfg.clip_eps_low
    high = tcfg.clip_eps if tcfg.clip_eps_high is None else tcfg.clip_eps_high
    old_of = prepared.old_of
    # |generator - trainer| log-prob per completion token: its max over this rank's
    # micro-batches, per update (a max does not add up over micro-batches like the metrics)
    mismatch_max: list[float] = []

    def loss_fn(index: int, batch: dict[str, torch.Tensor], logp: torch.Tensor,
                entropy: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        mask, ref_logp = batch["completion_mask"], ref_of[index]
        loss, parts = policy_loss(
            logp, prox_of[index], adv_of[index], mask, clip_eps_low=low, clip_eps_high=high,
            aggregation=tcfg.loss_aggregation, importance_ratio=tcfg.importance_ratio,
            ref_logp=ref_logp, kl_coef=0.0 if tcfg.kl_in_reward else tcfg.kl_coef,
            kl_estimator=tcfg.kl_estimator, token_count=token_count, seq_count=seq_count,
            norm_length=norm_length)
        with torch.no_grad():
            fmask = mask.to(logp.dtype)
            mismatch = (logp.detach() - old_of[index]).abs() * fmask
            if index == 0:
                mismatch_max.append(0.0)
            mismatch_max[-1] = max(mismatch_max[-1], float(mismatch.max()) if mask.any() else 0.0)
            # every value is already divided by the global token count: they add up over
            # micro-batches and data-parallel ranks (policy_loss's pg_loss / clip_frac too)
            return loss, {
                "logprob_mismatch_mean": float(mismatch.sum()) / token_count,
                "loss": float(loss.detach()),
                "pg_loss": parts["pg_loss"],
                "kl": parts["kl"],  # of trainer.kl_estimator, a token mean like the others
                "entropy": float((entropy * fmask).sum()) / token_count,
                "clip_frac": parts["clip_frac"],
                "ratio_mean": parts["ratio_mean"],
            }

    results = []
    for _ in range(tcfg.updates_per_batch):
        result = policy.train_step(micro_batches, loss_fn, temperature=temperature,
                                   with_entropy=True, after_backward=after_backward)
        # this rank's max only: the trainer takes the max over ranks (logprob_mismatch_check)
        worst = mismatch_max[-1] if len(mismatch_max) > len(results) else 0.0
        results.append(TrainStepResult(metrics={**result.metrics, "logprob_mismatch_max": worst},
                                       grad_norm=result.grad_norm))
    if len(results) == 1:
        return results[0]
    return TrainStepResult(
        metrics={key: float(np.mean([r.metrics[key] for r in results]))
                 for key in results[0].metrics},
        grad_norm=float(np.mean([r.grad_norm for r in results])))


class LogprobMismatchError(RuntimeError):
    """The generator's log-probs of its own samples and the trainer's differ beyond
    trainer.max_logprob_mismatch: the engines drifted (dtype, kernels, stale weights), and
    training on would be silently off-policy."""


def logprob_mismatch_check(metrics: dict[str, float], threshold: float | None, step: int, *,
                           group: dist.ProcessGroup | None = None, ranks: int = 1) -> None:
    """Make `metrics["logprob_mismatch_max"]` the max over the trainer ranks (every rank
    calls this), and raise `LogprobMismatchError` on all of them when it exceeds `threshold`
    (None or 0: off)."""
    if "logprob_mismatch_max" not in metrics:
        return
    if ranks > 1:
        worst = torch.tensor([metrics["logprob_mismatch_max"]], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
        metrics["logprob_mismatch_max"] = float(worst.item())
    worst = metrics["logprob_mismatch_max"]
    if threshold and worst > threshold:
        raise LogprobMismatchError(
            f"step {step}: a completion token's log-prob differs by {worst:.3g} between the "
            f"generator and the trainer (mean {metrics.get('logprob_mismatch_mean', float('nan')):.3g}"
            f" per token), over trainer.max_logprob_mismatch={threshold}: the generation engine "
            f"and the trainer disagree (dtype, kernels, a stale weight sync), or the samples "
            f"lag the policy (sync.max_staleness > 0 counts the policy's change too)")


def grpo_update(policy: TrainingEngine, reference: TrainingEngine,
                prompts: list[np.ndarray], completions: list[np.ndarray],
                old_logprobs: list[np.ndarray], advantages: torch.Tensor, token_count: float,
                tcfg: TrainerConfig, *, temperature: float,
                after_backward: Callable[[], None] | None = None) -> TrainStepResult:
    """One GRPO update of this rank's samples: `prepare_update` then `run_update`.

    `advantages` [n] on the policy's device; `token_count` is the completion tokens of the
    whole step over every data-parallel rank, so each micro-batch's loss and metrics are
    its share of the global token mean and add up (in `train_step`) to the step's values.
    """
    prepared = prepare_update(policy, reference, prompts, completions, old_logprobs, tcfg,
                              temperature=temperature)
    return run_update(policy, prepared, advantages, token_count, tcfg, temperature=temperature,
                      after_backward=after_backward)


TOKEN_LEVEL_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline")


def step_advantages(tcfg: TrainerConfig, rewards: torch.Tensor, group_ids: torch.Tensor,
                    lengths: np.ndarray, prepared: UpdateBatch, mine: np.ndarray, *,
                    group: dist.ProcessGroup | None = None, ranks: int = 1) -> torch.Tensor:
    """This rank's advantages from the whole step's rewards: `tcfg.advantage_estimator`
    looked up in `ADVANTAGE_ESTIMATORS`; [len(mine)] or [len(mine), max(lengths)].

    `rewards`, `group_ids` [N] and `lengths` [N] cover every sample of the step (all ranks);
    `prepared` holds this rank's samples `mine`. With trainer.kl_in_reward the per-token
    reward -kl_coef * KL_t needs every sample's KL: each rank computes its own, and a sum
    over the trainer group (zeros elsewhere: exact) gives every rank the whole [N, T] grid.
    """
    name = tcfg.advantage_estimator
    estimator = ADVANTAGE_ESTIMATORS[name]
    options: dict[str, object] = {"scale_by_std": tcfg.scale_rewards} if name == "grpo" else {}
    if name not in TOKEN_LEVEL_ESTIMATORS and not tcfg.kl_in_reward:
        advantages = estimator(rewards, group_ids, **options)  # GRPO's default path
    else:
        width = int(max(lengths.max(initial=0), 1))
        mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
        token_rewards = None
        if tcfg.kl_in_reward:
            kl = torch.zeros(len(lengths), width, dtype=torch.float32)
            for i, values in zip(mine.tolist(), prepared.token_kl(tcfg.kl_estimator), strict=True):
                kl[i, :len(values)] = torch.from_numpy(values)
            if ranks > 1:
                device = prepared.ref_of[0].device if prepared.ref_of else torch.device("cpu")
                kl = kl.to(device)
                dist.all_reduce(kl, group=group)
                kl = kl.cpu()
            token_rewards = -tcfg.kl_coef * kl
        advantages = estimator(rewards, group_ids, mask=mask, token_rewards=token_rewards,
                               **options)
    return advantages[torch.from_numpy(mine)]


def reward_metrics(batches: list[RolloutBatch], prefix: str = "reward") -> dict[str, float]:
    """`<prefix>_<function>_mean` over the samples each reward function applied to."""
    names = batches[0].reward_names if batches else ()
    out: dict[str, float] = {}
    for column, name in enumerate(names):
        values = np.concatenate([b.reward_values[:, column] for b in batches])
        applied = values[~np.isnan(values)]
        out[f"{prefix}_{name}_mean"] = float(applied.mean()) if applied.size else float("nan")
    return out
