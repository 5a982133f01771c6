"""One GRPO update through a training engine, and the reward metrics of a step's shards.

`grpo_update` is the trainer's step minus the control flow: micro-batches packed by the
policy engine, reference log-probs from the frozen engine, and a loss function that
`TrainingEngine.train_step` runs per micro-batch (gradient accumulation, the data-parallel
all-reduce, clipping and the AdamW step are the engine's). Every loss and metric is
normalised by the step's global completion-token count, so micro-batches and ranks add up
to the step's token means (`pg_loss` and `clip_frac` included: `grpo_loss` already divides
by that count, nothing may scale them again).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from hpcalign.algorithms.grpo import grpo_loss, kl_k3
from hpcalign.config.schema import TrainerConfig
from hpcalign.data.shards import RolloutBatch
from hpcalign.engines import TrainingEngine, TrainStepResult


def grpo_update(policy: TrainingEngine, reference: TrainingEngine,
                prompts: list[np.ndarray], completions: list[np.ndarray],
                old_logprobs: list[np.ndarray], advantages: torch.Tensor, token_count: float,
                tcfg: TrainerConfig, *, temperature: float,
                after_backward: Callable[[], None] | None = None) -> TrainStepResult:
    """One GRPO optimizer step of this rank's samples, in micro-batches of `tcfg.micro_batch`.

    `advantages` [n] on the policy's device; `token_count` is the completion tokens of the
    whole step over every data-parallel rank, so each micro-batch's loss and metrics are
    its share of the global token mean and add up (in `train_step`) to the step's values.
    """
    micro = tcfg.micro_batch or max(1, len(completions))
    micro_batches, rows_of, old_of, ref_of = [], [], [], []
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
        ref_of.append(reference.logprobs(batch, temperature=temperature)[0])

    def loss_fn(index: int, batch: dict[str, torch.Tensor], logp: torch.Tensor,
                entropy: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        mask, ref_logp = batch["completion_mask"], ref_of[index]
        loss, parts = grpo_loss(logp, old_of[index], ref_logp, advantages[rows_of[index]],
                                mask, clip_eps=tcfg.clip_eps, kl_coef=tcfg.kl_coef,
                                token_count=token_count)
        with torch.no_grad():
            fmask = mask.to(logp.dtype)
            # every value is already divided by the global token count: they add up over
            # micro-batches and data-parallel ranks (grpo_loss's pg_loss / clip_frac too)
            return loss, {
                "loss": float(loss.detach()),
                "pg_loss": parts["pg_loss"],
                "kl": float((kl_k3(logp, ref_logp) * fmask).sum()) / token_count,
                "entropy": float((entropy * fmask).sum()) / token_count,
                "clip_frac": parts["clip_frac"],
            }

    return policy.train_step(micro_batches, loss_fn, temperature=temperature, with_entropy=True,
                             after_backward=after_backward)


def reward_metrics(batches: list[RolloutBatch], prefix: str = "reward") -> dict[str, float]:
    """`<prefix>_<function>_mean` over the samples each reward function applied to."""
    names = batches[0].reward_names if batches else ()
    out: dict[str, float] = {}
    for column, name in enumerate(names):
        values = np.concatenate([b.reward_values[:, column] for b in batches])
        applied = values[~np.isnan(values)]
        out[f"{prefix}_{name}_mean"] = float(applied.mean()) if applied.size else float("nan")
    return out
