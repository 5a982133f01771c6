"""Rollouts as HDF5 shards: the sampling shared by the generator role and `hpcalign rollout`.

`sample_rollouts` turns prompt indices of a task into a `RolloutBatch` as the generator
role does for one step: each prompt in the tokenizer's own convention (`render_prompt`),
repeated `samples_per_prompt` times, one `generate` call of the torch generation engine
seeded by one integer, rewards from the task. It does no I/O, so the same prompts, model
and seed give the same batch (and the same shard checksum) every time.

`run_offline_rollout` is the offline driver behind `hpcalign rollout` (docs/rollout.md):
array task `shard_index` of `num_shards` takes a contiguous slice of the prompts, samples
it in batches of `batch_size` prompts and writes each batch to
`OUT_DIR/shard-{shard_index:04d}-{batch_index:05d}.h5`. A shard that already exists and
reads back cleanly is skipped, so a requeued array task only redoes what is missing.

    params = SamplingParams(samples_per_prompt=4, max_new_tokens=64)
    batch = sample_rollouts(model, tokenizer, task, [0, 1, 2], params, seed=7)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from hpcalign.data.datasets import render_prompt
from hpcalign.data.shards import Ragged, RolloutBatch, read_shard, write_shard
from hpcalign.data.tasks import Task, partial_match_reward
from hpcalign.durable import atomic_write_text
from hpcalign.engines.base import SamplingParams
from hpcalign.errors import ShardError, UserError

__all__ = ["ANSWER_REWARD", "OfflineRollout", "RolloutSummary", "SamplingParams",
           "answer_reward", "batch_seed", "offline_shard_path", "run_offline_rollout",
           "sample_rollouts", "slice_prompts"]

# The reward `hpcalign rollout` uses without --reward (see `answer_reward`), by import path
# because that is how `TaskConfig.reward` names a reward function.
ANSWER_REWARD = "hpcalign.data.rollout:answer_reward"


def sample_rollouts(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    prompt_indices: Sequence[int] | np.ndarray,
    params: SamplingParams,
    *,
    seed: int,
    step: int = 0,
    policy_version: int = 0,
    generator_rank: int = 0,
    attrs: dict[str, str | int | float] | None = None,
) -> RolloutBatch:
    """Sample `params.samples_per_prompt` completions of each prompt and score them.

    Samples of one prompt are adjacent (`prompt_ids = repeat(prompt_indices, K)`), all drawn
    in one batch from a generator seeded with `seed` on the model's device, so the result
    depends only on the arguments (and the device type). `attrs` go to the shard as is;
    keep timings out of them so equal rollouts give equal bytes.
    """
    from hpcalign.engines.torch_generation import TorchGenerationEngine

    engine = TorchGenerationEngine(model, tokenizer)
    indices = np.asarray(prompt_indices, np.int64)
    prompt_ids = np.repeat(indices, params.samples_per_prompt)  # [N], groups adjacent
    prompts = {int(i): render_prompt(tokenizer, task.prompt(int(i))) for i in indices}
    expanded = [prompts[int(i)] for i in prompt_ids]
    out = engine.generate(expanded, params, seed)
    texts = tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
    rewards = np.array([task.reward(int(i), text) for i, text in zip(prompt_ids, texts)],
                       np.float32)
    return RolloutBatch(
        step=step, policy_version=policy_version, generator_rank=generator_rank,
        prompt_ids=prompt_ids,
        prompt_tokens=Ragged.from_list(expanded, np.int32),
        completion_tokens=Ragged.from_list(out.token_ids, np.int32),
        logprobs=Ragged.from_list(out.logprobs, np.float32),
        rewards=rewards, seeds=np.full(len(prompt_ids), seed, np.int64),
        finished=np.asarray(out.finished, bool),
        attrs=dict(attrs or {}),
    )


def answer_reward(prompt: str, answer: str, completion: str) -> float:
    """`partial_match_reward` against the answer, NaN for a prompt without one.

    The default of `hpcalign rollout`: prompt files for distillation often have no answers,
    and NaN says "not scored" where 0.0 would claim a wrong answer. A JSONL line without
    "answer" reaches here as "" (tasks.py fills it in when a reward function is given).
    """
    return partial_match_reward(prompt, answer, completion) if answer else math.nan


def slice_prompts(num_prompts: int, shard_index: int, num_shards: int) -> np.ndarray:
    """Task indices of array task `shard_index`: its contiguous `np.array_split` slice.

    Slices are disjoint and cover 0..num_prompts-1; sizes differ by at most one, and a task
    past the end (more tasks than prompts) gets an empty slice.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index ({shard_index}) < num_shards ({num_shards})")
    return np.array_split(np.arange(num_prompts, dtype=np.int64), num_shards)[shard_index]


def batch_seed(seed: int, shard_index: int, batch_index: int) -> int:
    """Sampling seed of one offline batch: independent streams, the same on every rerun."""
    state = np.random.SeedSequence([seed % 2**64, shard_index, batch_index]).generate_state(1, np.uint64)
    return int(state[0] % (2**63 - 1))


def offline_shard_path(out_dir: str, shard_index: int, batch_index: int) -> str:
    """`OUT_DIR/shard-0003-00012.h5`: array task 3, its batch 12; sorts in prompt order."""
    return os.path.join(out_dir, f"shard-{shard_index:04d}-{batch_index:05d}.h5")


@dataclass(kw_only=True)
class OfflineRollout:
    """One array task of `hpcalign rollout`: what to sample, with what, and where to."""

    model: torch.nn.Module
    tokenizer: object
    task: Task
    params: SamplingParams
    out_dir: str
    shard_index: int = 0
    num_shards: int = 1
    batch_size: int = 64
    """Prompts per shard (each gives `samples_per_prompt` samples)."""
    seed: int = 1234
    policy_version: int = 0
    attrs: dict[str, str | int | float] = field(default_factory=dict)
    """Recorded in every shard (checkpoint, prompt file, ...), next to the sampling params."""


@dataclass(kw_only=True)
class RolloutSummary:
    """What one array task did: written to `OUT_DIR/rollout-summary-{I:04d}.json`."""

    shard_index: int
    num_shards: int
    prompts: int
    shards_written: int = 0
    shards_skipped: int = 0
    samples: int = 0
    scored_samples: int = 0
    reward_mean: float | None = None
    completion_tokens: int = 0
    """Tokens sampled by this invocation (skipped shards not counted)."""
    sample_s: float = 0.0
    """Seconds spent sampling and scoring (skipped shards not counted)."""
    elapsed_s: float = 0.0
    shards: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.sample_s if self.sample_s > 0 else 0.0

    def line(self) -> str:
        reward = "n/a" if self.reward_mean is None else f"{self.reward_mean:.4f}"
        return (f"rollout {self.shard_index}/{self.num_shards}: {self.shards_written} shards "
                f"written, {self.shards_skipped} skipped, {self.samples} samples of "
                f"{self.prompts} prompts, mean reward {reward}, "
                f"{self.tokens_per_s:.1f} tokens/s")

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def _existing(path: str, attrs: dict, policy_version: int,
              prompt_ids: np.ndarray) -> RolloutBatch | None:
    """The shard at `path` if it is complete and from this very rollout, None to (re)write it.

    NOTE: a valid shard from OTHER settings (another seed, checkpoint, batch size...) is an
    error rather than something to overwrite or skip: either would leave OUT_DIR holding a
    mix of two rollouts that nothing downstream could tell apart.
    """
    if not os.path.exists(path):
        return None
    try:
        found = read_shard(path, retry_s=0)
    except ShardError:
        return None  # truncated or corrupted (a killed writer cannot cause this; disks can)
    differs = sorted(key for key in {*found.attrs, *attrs} if found.attrs.get(key) != attrs.get(key))
    if found.policy_version != policy_version:
        differs.append("policy_version")
    if not differs and not np.array_equal(found.prompt_ids, prompt_ids):
        differs.append("prompt_ids")
    if differs:
        raise UserError(f"{path} is from another rollout ({', '.join(differs)} differ); "
                        "write to a new --out directory or delete the old shards")
    return found


def run_offline_rollout(job: OfflineRollout) -> RolloutSummary:
    """Sample this array task's slice into shards, skipping those already complete."""
    start = time.perf_counter()
    indices = slice_prompts(job.task.num_prompts, job.shard_index, job.num_shards)
    summary = RolloutSummary(shard_index=job.shard_index, num_shards=job.num_shards,
                             prompts=len(indices))
    os.makedirs(job.out_dir, mode=0o700, exist_ok=True)
    rewards: list[np.ndarray] = []
    num_batches = math.ceil(len(indices) / job.batch_size)
    for batch_index in range(num_batches):
        mine = indices[batch_index * job.batch_size:(batch_index + 1) * job.batch_size]
        seed = batch_seed(job.seed, job.shard_index, batch_index)
        attrs = {**job.attrs, **job.params.as_attrs(), "seed": job.seed,
                 "shard_index": job.shard_index, "num_shards": job.num_shards,
                 "batch_index": batch_index, "batch_size": job.batch_size}
        path = offline_shard_path(job.out_dir, job.shard_index, batch_index)
        batch = _existing(path, attrs, job.policy_version,
                          np.repeat(mine, job.params.samples_per_prompt))
        if batch is not None:
            summary.shards_skipped += 1
        else:
            sample_start = time.perf_counter()
            # step = policy_version: an offline rollout is on-policy (staleness 0).
            batch = sample_rollouts(job.model, job.tokenizer, job.task, mine, job.params,
                                    seed=seed, step=job.policy_version,
                                    policy_version=job.policy_version,
                                    generator_rank=job.shard_index, attrs=attrs)
            write_shard(path, batch)
            summary.sample_s += time.perf_counter() - sample_start
            summary.completion_tokens += int(batch.completion_tokens.lengths().sum())
            summary.shards_written += 1
        summary.samples += len(batch)
        summary.shards.append(os.path.basename(path))
        rewards.append(batch.rewards)
    scored = np.concatenate(rewards) if rewards else np.zeros(0, np.float32)
    scored = scored[~np.isnan(scored)]
    summary.scored_samples = len(scored)
    summary.reward_mean = float(scored.mean()) if len(scored) else None
    summary.elapsed_s = time.perf_counter() - start
    _write_json(os.path.join(job.out_dir, f"rollout-summary-{job.shard_index:04d}.json"),
                summary.to_json())
    return summary


def _write_json(path: str, data: dict) -> None:
    """Write `data` to `path` via a temp file and rename, so a reader never sees half of it."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
