"""Offline rollouts: the driver behind `hpcalign rollout` (docs/rollout.md).

Array task `shard_index` of `num_shards` takes one contiguous slice of a fixed shuffle of
the dataset's rows, samples it in batches of `batch_size` prompts through a generation
engine and the reward functions (`engines.rollouts.sample_and_score`, the generator
role's own step) and writes each batch to
`OUT_DIR/shard-{shard_index:04d}-{batch_index:05d}.h5`. A shard that already exists and
reads back cleanly is skipped, so a requeued array task only redoes what is missing.

    job = OfflineRollout(engine=engine, prompts=dataset, rewards=rewards, params=params,
                         out_dir="runs/r1/offline")
    summary = run_offline_rollout(job)
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from hpcalign.data.shards import RolloutBatch, read_shard, write_shard
from hpcalign.data.sources import Prompts
from hpcalign.durable import atomic_write_text
from hpcalign.engines.base import GenerationEngine, SamplingParams
from hpcalign.engines.rollouts import sample_and_score
from hpcalign.errors import ShardError, UserError
from hpcalign.rewards import RewardSet

__all__ = ["ORDER_SEED", "OfflineRollout", "RolloutSummary", "batch_seed", "offline_shard_path",
           "prompt_order", "run_offline_rollout", "slice_prompts"]

# NOTE: the order's seed is fixed, not the sampling seed: a row keeps its array task and
# batch whatever seed or checkpoint is sampled, so two rollouts of one file line up.
ORDER_SEED = 0

# Shard attributes the sampling adds (not settings): left out when comparing a found shard
# with the settings of this rollout.
_OUTCOME_ATTRS = ("prompts_skipped",)


def prompt_order(num_prompts: int) -> np.ndarray:
    """The rows in the order array tasks take them: a fixed shuffle, which spreads a file
    sorted by length evenly over the tasks."""
    return np.random.default_rng(ORDER_SEED).permutation(num_prompts).astype(np.int64)


def slice_prompts(num_prompts: int, shard_index: int, num_shards: int) -> np.ndarray:
    """Positions in `prompt_order` of array task `shard_index`: its `np.array_split` slice.

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
    """`OUT_DIR/shard-0003-00012.h5`: array task 3, its batch 12."""
    return os.path.join(out_dir, f"shard-{shard_index:04d}-{batch_index:05d}.h5")


@dataclass(kw_only=True)
class OfflineRollout:
    """One array task of `hpcalign rollout`: what to sample, with what, and where to."""

    engine: GenerationEngine
    prompts: Prompts
    rewards: RewardSet
    params: SamplingParams
    out_dir: str
    shard_index: int = 0
    num_shards: int = 1
    batch_size: int = 64
    """Prompts per shard (each gives `samples_per_prompt` samples)."""
    seed: int = 1234
    policy_version: int = 0
    max_prompt_tokens: int | None = None
    truncation: str = "skip"
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
    prompts_skipped: int = 0
    """Prompts longer than `max_prompt_tokens` (truncation "skip"), in every shard."""
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
        skipped = f" ({self.prompts_skipped} too long, skipped)" if self.prompts_skipped else ""
        return (f"rollout {self.shard_index}/{self.num_shards}: {self.shards_written} shards "
                f"written, {self.shards_skipped} skipped, {self.samples} samples of "
                f"{self.prompts} prompts{skipped}, mean reward {reward}, "
                f"{self.tokens_per_s:.1f} tokens/s")

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def _existing(path: str, attrs: dict, policy_version: int, rows: np.ndarray,
              samples_per_prompt: int) -> RolloutBatch | None:
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
    keys = {*found.attrs, *attrs} - set(_OUTCOME_ATTRS)
    differs = sorted(key for key in keys if found.attrs.get(key) != attrs.get(key))
    if found.policy_version != policy_version:
        differs.append("policy_version")
    # the batch's rows in order, K samples each (less the prompts max_prompt_tokens skipped)
    expected = np.repeat(rows[np.isin(rows, found.prompt_ids)], samples_per_prompt)
    if not differs and not np.array_equal(found.prompt_ids, expected):
        differs.append("prompt_ids")
    if differs:
        raise UserError(f"{path} is from another rollout ({', '.join(differs)} differ); "
                        "write to a new --out directory or delete the old shards")
    return found


def run_offline_rollout(job: OfflineRollout) -> RolloutSummary:
    """Sample this array task's slice into shards, skipping those already complete."""
    start = time.perf_counter()
    order = prompt_order(len(job.prompts))
    rows_of_task = order[slice_prompts(len(job.prompts), job.shard_index, job.num_shards)]
    summary = RolloutSummary(shard_index=job.shard_index, num_shards=job.num_shards,
                             prompts=len(rows_of_task))
    os.makedirs(job.out_dir, mode=0o700, exist_ok=True)
    rewards: list[np.ndarray] = []
    for batch_index in range(math.ceil(len(rows_of_task) / job.batch_size)):
        rows = rows_of_task[batch_index * job.batch_size:(batch_index + 1) * job.batch_size]
        seed = batch_seed(job.seed, job.shard_index, batch_index)
        attrs = {**job.attrs, **job.params.as_attrs(), "seed": job.seed,
                 "shard_index": job.shard_index, "num_shards": job.num_shards,
                 "batch_index": batch_index, "batch_size": job.batch_size}
        path = offline_shard_path(job.out_dir, job.shard_index, batch_index)
        batch = _existing(path, attrs, job.policy_version, rows, job.params.samples_per_prompt)
        if batch is not None:
            summary.shards_skipped += 1
        else:
            sample_start = time.perf_counter()
            # step = policy_version: an offline rollout is on-policy (staleness 0)
            batch = sample_and_score(
                job.engine, job.prompts, job.rewards, rows, job.params, seed=seed,
                step=job.policy_version, policy_version=job.policy_version,
                generator_rank=job.shard_index, attrs=attrs,
                max_prompt_tokens=job.max_prompt_tokens, truncation=job.truncation).batch
            write_shard(path, batch)
            summary.sample_s += time.perf_counter() - sample_start
            summary.completion_tokens += int(batch.completion_tokens.lengths().sum())
            summary.shards_written += 1
        summary.samples += len(batch)
        summary.prompts_skipped += int(batch.attrs.get("prompts_skipped", 0))
        summary.shards.append(os.path.basename(path))
        rewards.append(batch.rewards)
    scored = np.concatenate(rewards) if rewards else np.zeros(0, np.float32)
    scored = scored[~np.isnan(scored)]
    summary.scored_samples = len(scored)
    summary.reward_mean = float(scored.mean()) if len(scored) else None
    summary.elapsed_s = time.perf_counter() - start
    atomic_write_text(os.path.join(job.out_dir, f"rollout-summary-{job.shard_index:04d}.json"),
                      json.dumps(summary.to_json(), indent=2, allow_nan=False) + "\n")
    return summary
