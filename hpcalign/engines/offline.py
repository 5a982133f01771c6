"""Offline rollouts: the driver behind `hpcalign rollout` (docs/rollout.md).

Part `shard_index` of `num_shards` (an array task, or one of its `--workers`) takes one
contiguous slice of a fixed shuffle of the dataset's rows, samples it in batches of
`batch_size` prompts through a generation engine and the reward functions
(`engines.rollouts.sample_and_score`, the generator role's own step) and writes each
batch to `OUT_DIR/shard-{shard_index:04d}-{batch_index:05d}.h5`. A shard that already
exists and reads back cleanly is skipped, so a requeued array task only redoes what is
missing. Every sample draws from its own seed (`engines.rollouts.sample_seed` of the
rollout's seed, its prompt row and its index in the group), so the samples are the same
whatever the number of parts, the batch size or the kills and resumes in between. At its
end a part records its shards in the manifest (`data/manifest.py`).

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

from hpcalign import faults
from hpcalign.data.manifest import assemble, write_part
from hpcalign.data.shards import RolloutBatch, read_shard, trusted_checksum, write_shard
from hpcalign.data.sources import Prompts
from hpcalign.durable import atomic_write_text
from hpcalign.engines.base import GenerationEngine, SamplingParams
from hpcalign.engines.rollouts import sample_and_score
from hpcalign.errors import ShardError, UserError
from hpcalign.rewards import RewardSet

__all__ = ["ORDER_SEED", "OfflineRollout", "RolloutSummary", "offline_shard_path",
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
    manifest: dict | None = None
    """The rollout's manifest record (checkpoint, prompts, sampling; `data/manifest.py`),
    None: no manifest (a caller that is not `hpcalign rollout`)."""
    progress: bool = False
    """A progress bar on stderr (prompts/s, tokens/s)."""


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
    write_s: float = 0.0
    """Seconds spent writing shards (checksums and fsync included)."""
    prompts_sampled: int = 0
    """Prompts this invocation sampled (skipped shards not counted)."""
    elapsed_s: float = 0.0
    shards: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.sample_s if self.sample_s > 0 else 0.0

    @property
    def prompts_per_s(self) -> float:
        """Prompts sampled per second of sampling (skipped shards not counted)."""
        return self.prompts_sampled / self.sample_s if self.sample_s > 0 else 0.0

    def line(self) -> str:
        reward = "n/a" if self.reward_mean is None else f"{self.reward_mean:.4f}"
        skipped = f" ({self.prompts_skipped} too long, skipped)" if self.prompts_skipped else ""
        return (f"rollout {self.shard_index}/{self.num_shards}: {self.shards_written} shards "
                f"written, {self.shards_skipped} skipped, {self.samples} samples of "
                f"{self.prompts} prompts{skipped}, mean reward {reward}, "
                f"{self.prompts_per_s:.1f} prompts/s, {self.tokens_per_s:.1f} tokens/s")

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s,
                "prompts_per_s": self.prompts_per_s}


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
    shards: list[dict] = []
    bar = _progress_bar(job, len(rows_of_task))
    for batch_index in range(math.ceil(len(rows_of_task) / job.batch_size)):
        rows = rows_of_task[batch_index * job.batch_size:(batch_index + 1) * job.batch_size]
        attrs = {**job.attrs, **job.params.as_attrs(), "seed": job.seed,
                 "shard_index": job.shard_index, "num_shards": job.num_shards,
                 "batch_index": batch_index, "batch_size": job.batch_size}
        path = offline_shard_path(job.out_dir, job.shard_index, batch_index)
        batch = _existing(path, attrs, job.policy_version, rows, job.params.samples_per_prompt)
        if batch is not None:
            summary.shards_skipped += 1
            file_checksum = trusted_checksum(path) or _file_checksum(path)
        else:
            sample_start = time.perf_counter()
            # step = policy_version: an offline rollout is on-policy (staleness 0)
            batch = sample_and_score(
                job.engine, job.prompts, job.rewards, rows, job.params, seed=job.seed,
                step=job.policy_version, policy_version=job.policy_version,
                generator_rank=job.shard_index, attrs=attrs,
                max_prompt_tokens=job.max_prompt_tokens, truncation=job.truncation,
                per_sample_seeds=True).batch
            sampled_s = time.perf_counter() - sample_start
            write_start = time.perf_counter()
            file_checksum = write_shard(path, batch).file_checksum
            faults.maybe_fire("rollout-shard", step=batch_index)
            summary.write_s += time.perf_counter() - write_start
            summary.sample_s += sampled_s
            summary.completion_tokens += int(batch.completion_tokens.lengths().sum())
            summary.shards_written += 1
            summary.prompts_sampled += len(rows)
        shards.append({"file": os.path.basename(path), "file_checksum": file_checksum,
                       "samples": len(batch)})
        if bar is not None:
            bar.update(len(rows))
            if summary.sample_s > 0:
                bar.set_postfix(tokens_per_s=f"{summary.tokens_per_s:.0f}", refresh=False)
        summary.samples += len(batch)
        summary.prompts_skipped += int(batch.attrs.get("prompts_skipped", 0))
        summary.shards.append(os.path.basename(path))
        rewards.append(batch.rewards)
    scored = np.concatenate(rewards) if rewards else np.zeros(0, np.float32)
    scored = scored[~np.isnan(scored)]
    summary.scored_samples = len(scored)
    summary.reward_mean = float(scored.mean()) if len(scored) else None
    if bar is not None:
        bar.close()
    summary.elapsed_s = time.perf_counter() - start
    atomic_write_text(os.path.join(job.out_dir, f"rollout-summary-{job.shard_index:04d}.json"),
                      json.dumps(summary.to_json(), indent=2, allow_nan=False) + "\n")
    if job.manifest is not None:
        write_part(job.out_dir, job.shard_index, {**job.manifest, "shards": shards})
        assemble(job.out_dir, job.num_shards)
    return summary


def _progress_bar(job: OfflineRollout, prompts: int):
    """tqdm over this part's prompts (prompts/s as its rate), or None."""
    if not job.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=prompts, unit="prompt", desc=f"rollout {job.shard_index}/{job.num_shards}",
                mininterval=1.0, dynamic_ncols=True)


def _file_checksum(path: str) -> str:
    """The whole-file checksum of a shard without a sidecar (verified by `_existing`)."""
    from hpcalign.data.manifest import content_hash

    return content_hash(path)
