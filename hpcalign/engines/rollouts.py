"""One batch of rollouts: rows of a prompt dataset, sampled by a generation engine, scored.

The generator role's step and each batch of `hpcalign rollout` are this one function, so
an offline rollout samples and scores exactly as training does: prompts rendered in the
tokenizer's own convention (`data.sources.render`), `max_prompt_tokens` applied
(`data.datasets.filter_prompts`), each kept prompt repeated `samples_per_prompt` times
(the samples of a prompt adjacent), one `engine.generate` call seeded by one integer,
then the TRL-signature reward functions over the decoded completions. No I/O: equal
arguments give an equal batch (and equal shard bytes) on the same device.

    rollouts = sample_and_score(engine, dataset, rewards, rows, params, seed=7)
    write_shard(path, rollouts.batch)
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hpcalign.data.datasets import filter_prompts
from hpcalign.data.shards import Ragged, RolloutBatch
from hpcalign.data.sources import Prompts, render
from hpcalign.engines.base import GenerationEngine, GenerationOutput, SamplingParams
from hpcalign.rewards import RewardSet, TrainerState


def sample_seed(seed: int, prompt_id: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of dataset row `prompt_id` in a rollout seeded by
    `seed`: independent streams, a pure function of the three (nothing else in the job)."""
    state = np.random.SeedSequence([seed % 2**64, prompt_id, sample_index]).generate_state(
        1, np.uint64)
    return int(state[0] % (2**63 - 1))


def _generate_per_sample(engine: GenerationEngine, prompts: list[list[int]],
                         params: SamplingParams, seeds: np.ndarray) -> GenerationOutput:
    """`engine.generate` with one seed per sample, one call per prompt's group of K.

    NOTE: why a call per group rather than one for the batch: on CPU a row's floats depend
    on the other rows of its call — on the left padding the longest prompt imposes, and,
    even without padding, on the number of rows and the row's position among them (the
    matmul kernels block rows; measured here: equal inputs at another row position differ
    in the last bits of the log-probs). A group of K samples of one prompt is the same call
    whatever the batch size or the split over workers, so its samples are too. The cost is
    smaller calls (docs/rollout.md gives the figure); GPU kernels, which choose algorithms
    by shape, make the same promise only per group as well.
    """
    k = params.samples_per_prompt
    token_ids: list[list[int]] = []
    logprobs: list[list[float]] = []
    reasons: list[str] = []
    for first in range(0, len(prompts), k):
        out = engine.generate(prompts[first:first + k], params, 0,
                              sample_seeds=[int(s) for s in seeds[first:first + k]])
        token_ids += out.token_ids
        logprobs += out.logprobs
        reasons += out.finish_reasons
    return GenerationOutput(token_ids=token_ids, logprobs=logprobs, finish_reasons=reasons)


@dataclass(frozen=True)
class ScoredRollouts:
    """A scored batch, with what the metrics need besides it."""

    batch: RolloutBatch
    texts: list[str]
    """The completions as the reward functions saw them (decoded, special tokens dropped)."""
    time_reward_s: float
    prompts_skipped: int
    """Rows dropped by `max_prompt_tokens` with truncation "skip" (recorded in the shard)."""


def sample_and_score(
    engine: GenerationEngine,
    prompts: Prompts,
    rewards: RewardSet,
    rows: Sequence[int] | np.ndarray,
    params: SamplingParams,
    *,
    seed: int,
    step: int = 0,
    policy_version: int = 0,
    generator_rank: int = 0,
    attrs: Mapping[str, str | int | float] | None = None,
    max_prompt_tokens: int | None = None,
    truncation: str = "skip",
    trainer_state: TrainerState | None = None,
    per_sample_seeds: bool = False,
) -> ScoredRollouts:
    """Sample `params.samples_per_prompt` completions of each of `rows` and score them.

    `prompt_ids` of the batch are the dataset rows (repeated K times). With no reward
    functions every reward is NaN ("not scored"), as it is for a sample every function
    returned None for. `attrs` go to the shard (plus `prompts_skipped`); keep timings out
    of them so equal rollouts give equal bytes.

    `per_sample_seeds` (offline rollouts): sample j of prompt row r draws from its own
    seed, `sample_seed(seed, r, j)` (the shard's `seeds`), and each prompt's group is
    sampled by a call of its own, so a sample does not depend on which other rows share
    the batch: any batch size and any split over workers give the same samples. The
    training step instead draws the whole call from `seed` (`roles.context.shard_seed`).
    """
    tokenizer = engine.tokenizer
    rows = np.asarray(rows, np.int64)
    kept, token_ids, skipped = filter_prompts(render(tokenizer, prompts, rows),
                                              max_prompt_tokens, truncation)
    rows = rows[kept]
    k = params.samples_per_prompt
    prompt_ids = np.repeat(rows, k)  # [N], the samples of a prompt adjacent
    expanded = [ids for ids in token_ids for _ in range(k)]
    if per_sample_seeds:
        seeds = np.array([sample_seed(seed, int(row), j) for row in rows for j in range(k)],
                         np.int64)
        out = _generate_per_sample(engine, expanded, params, seeds)
    else:
        seeds = np.full(len(prompt_ids), seed, np.int64)
        out = engine.generate(expanded, params, seed)
    reward_start = time.perf_counter()
    texts = tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
    columns = {name: [v for v in values for _ in range(k)]
               for name, values in prompts.column_values(rows).items()}
    total, per_function = rewards.score(
        [prompts.prompt(int(i)) for i in prompt_ids], texts, out.token_ids, columns,
        conversational=prompts.is_conversational, trainer_state=trainer_state)
    if not rewards.functions:
        total = np.full(len(prompt_ids), np.nan, np.float32)
    time_reward = time.perf_counter() - reward_start
    names = tuple(rewards.names)
    values = (np.stack([per_function[n] for n in names], axis=1) if len(prompt_ids) and names
              else np.zeros((len(prompt_ids), len(names)), np.float32))
    batch = RolloutBatch(
        step=step, policy_version=policy_version, generator_rank=generator_rank,
        prompt_ids=prompt_ids,
        prompt_tokens=Ragged.from_list(expanded, np.int32),
        completion_tokens=Ragged.from_list(out.token_ids, np.int32),
        logprobs=Ragged.from_list(out.logprobs, np.float32),
        rewards=np.asarray(total, np.float32), seeds=seeds,
        finished=np.asarray(out.finished, bool),
        attrs={**(attrs or {}), "prompts_skipped": skipped},
        reward_names=names, reward_values=values.astype(np.float32))
    return ScoredRollouts(batch, texts, time_reward, skipped)


def _select(batch: RolloutBatch, index: np.ndarray) -> RolloutBatch:
    """The samples `index` of `batch` (in that order)."""
    def ragged(r: Ragged, dtype) -> Ragged:
        return Ragged.from_list([r[int(i)] for i in index], dtype)

    values = batch.reward_values
    return RolloutBatch(
        step=batch.step, policy_version=batch.policy_version,
        generator_rank=batch.generator_rank, prompt_ids=batch.prompt_ids[index],
        prompt_tokens=ragged(batch.prompt_tokens, np.int32),
        completion_tokens=ragged(batch.completion_tokens, np.int32),
        logprobs=ragged(batch.logprobs, np.float32), rewards=batch.rewards[index],
        seeds=batch.seeds[index], finished=batch.finished[index], attrs=dict(batch.attrs),
        reward_names=batch.reward_names,
        reward_values=None if values is None else values[index])


def keep_informative(scored: ScoredRollouts) -> ScoredRollouts:
    """Only the groups (samples of one prompt id) with two scored rewards that differ."""
    batch = scored.batch
    keep = []
    for row in dict.fromkeys(batch.prompt_ids.tolist()):
        members = np.nonzero(batch.prompt_ids == row)[0]
        values = batch.rewards[members]
        values = values[~np.isnan(values)]
        if len(values) >= 2 and values.max() != values.min():
            keep.extend(members.tolist())
    index = np.asarray(keep, np.int64)
    return ScoredRollouts(_select(batch, index), [scored.texts[i] for i in keep],
                          scored.time_reward_s, scored.prompts_skipped)


def concat_rollouts(parts: Sequence[ScoredRollouts], *, max_groups: int,
                    attrs: Mapping[str, str | int | float]) -> ScoredRollouts:
    """The parts' samples in order as one batch, cut after `max_groups` groups; the first
    part's step, version and rank; `attrs` added (what the refill did)."""
    groups: set[int] = set()
    kept = []
    for part in parts:
        for i in range(len(part.batch)):
            row = int(part.batch.prompt_ids[i])
            if row not in groups:
                if len(groups) == max_groups:
                    continue
                groups.add(row)
            kept.append((part, i))
    first = parts[0].batch
    flat = RolloutBatch(
        step=first.step, policy_version=first.policy_version, generator_rank=first.generator_rank,
        prompt_ids=np.array([p.batch.prompt_ids[i] for p, i in kept], np.int64),
        prompt_tokens=Ragged.from_list([p.batch.prompt_tokens[i] for p, i in kept], np.int32),
        completion_tokens=Ragged.from_list([p.batch.completion_tokens[i] for p, i in kept],
                                           np.int32),
        logprobs=Ragged.from_list([p.batch.logprobs[i] for p, i in kept], np.float32),
        rewards=np.array([p.batch.rewards[i] for p, i in kept], np.float32),
        seeds=np.array([p.batch.seeds[i] for p, i in kept], np.int64),
        finished=np.array([p.batch.finished[i] for p, i in kept], bool),
        attrs={**first.attrs, **attrs}, reward_names=first.reward_names,
        reward_values=(np.stack([p.batch.reward_values[i] for p, i in kept])
                       if kept and first.reward_values is not None
                       else np.zeros((0, len(first.reward_names)), np.float32)))
    return ScoredRollouts(flat, [p.texts[i] for p, i in kept],
                          sum(p.time_reward_s for p in parts),
                          sum(p.prompts_skipped for p in parts))
