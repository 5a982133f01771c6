"""Generator role: sample the prompts of each step, score them, publish one HDF5 shard.

Step k is sampled with policy version max(0, k - max_staleness) exactly — never a fresher
one that happened to arrive early — so a run is reproducible bitwise whatever the timing,
and a resumed run samples what the uninterrupted one would have.

One step of one generator: its slice of the step's prompt rows (`indices_for_step`) →
token ids in the tokenizer's own convention (`render_prompt`; rows over
`data.max_prompt_tokens` skipped or cut) → each prompt `samples_per_prompt` times through
the generation engine (`generator.backend`) → completions decoded and scored by the reward
functions with TRL's call convention → one shard with the total and per-function rewards.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from hpcalign.comm.control import CONTROL_KINDS, TAG_CONTROL, TAG_SHARD
from hpcalign.comm.weights import NamedWeightReceiver
from hpcalign.config.schema import Config, GeneratorConfig
from hpcalign.data.datasets import indices_for_step
from hpcalign.data.shards import shard_path, write_shard
from hpcalign.data.sources import Sources, load_sources
from hpcalign.engines import GenerationEngine, SamplingParams, build_generation_engine
from hpcalign.engines.rollouts import (
    ScoredRollouts,
    concat_rollouts,
    keep_informative,
    sample_and_score,
)
from hpcalign.errors import ProtocolError
from hpcalign.models.tokenizer import char_symbols
from hpcalign.rewards import TrainerState
from hpcalign.roles.context import RoleContext, shard_seed

log = logging.getLogger(__name__)


def sampling_params(gen: GeneratorConfig) -> SamplingParams:
    """The sampling settings of the `generator` section."""
    return SamplingParams(samples_per_prompt=gen.samples_per_prompt,
                          max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                          top_p=gen.top_p, top_k=gen.top_k, ignore_eos=gen.ignore_eos)


def generator_rows(cfg: Config, num_prompts: int, step: int, generator_index: int) -> np.ndarray:
    """The dataset rows generator `generator_index` samples at `step`: its contiguous share
    of the step's prompts (`indices_for_step`)."""
    gen = cfg.generator
    per_rank = gen.prompts_per_step // gen.ranks
    indices = indices_for_step(num_prompts, cfg.seed, step, gen.prompts_per_step)
    return np.asarray(indices[generator_index * per_rank:(generator_index + 1) * per_rank],
                      np.int64)


def step_rollouts(engine: GenerationEngine, sources: Sources, cfg: Config, step: int,
                  generator_index: int, policy_version: int, rows: np.ndarray) -> ScoredRollouts:
    """Generator `generator_index`'s prompt `rows` of `step`, sampled with `policy_version`
    and scored: exactly what its shard holds (no I/O, so a replay can call it too).

    With `trainer.dynamic_sampling` and `generator.refill_rounds` > 0 (DAPO's dynamic
    sampling), groups whose rewards are all equal are dropped here and replaced by groups
    of other prompts, sampled in up to `refill_rounds` extra batches (`refill_rows`), until
    the shard holds as many groups as `rows`; a shard the rounds could not fill is
    published short (the trainer counts it).
    """
    state = TrainerState(global_step=step, max_steps=cfg.trainer.steps,
                         epoch=step * cfg.generator.prompts_per_step / len(sources.train))

    def sample(batch_rows: np.ndarray, seed: int) -> ScoredRollouts:
        return sample_and_score(
            engine, sources.train, sources.rewards, batch_rows, sampling_params(cfg.generator),
            seed=seed, step=step, policy_version=policy_version, generator_rank=generator_index,
            attrs={"task": sources.name},  # no timings: equal rollouts, equal bytes
            max_prompt_tokens=cfg.data.max_prompt_tokens, truncation=cfg.data.truncation,
            trainer_state=state)

    scored = sample(rows, shard_seed(cfg.seed, step, generator_index))
    rounds = cfg.generator.refill_rounds if cfg.trainer.dynamic_sampling else 0
    if not rounds:
        return scored
    parts = [keep_informative(scored)]
    have, used = len(np.unique(parts[0].batch.prompt_ids)), 0
    for refill in range(1, rounds + 1):
        if have >= len(rows):
            break
        extra = refill_rows(cfg, len(sources.train), step, generator_index, refill, len(rows))
        if not len(extra):
            break
        parts.append(keep_informative(sample(extra, refill_seed(cfg.seed, step, generator_index,
                                                                refill))))
        have += len(np.unique(parts[-1].batch.prompt_ids))
        used = refill
    return concat_rollouts(parts, max_groups=len(rows), attrs={"refill_rounds": used})


def refill_seed(seed: int, step: int, generator_index: int, refill: int) -> int:
    """The sampling seed of refill round `refill` (>= 1) of one (step, generator)."""
    return int(np.random.SeedSequence([seed, step, generator_index, refill]).generate_state(
        1, np.uint64)[0] % (2**63 - 1))


def refill_rows(cfg: Config, num_prompts: int, step: int, generator_index: int, refill: int,
                count: int) -> np.ndarray:
    """`count` prompt rows for refill round `refill`: a seeded draw from the rows no
    generator samples at this step, split between generators (so no two groups of a step
    share a prompt id, which the trainer groups by)."""
    gen = cfg.generator
    taken = set(indices_for_step(num_prompts, cfg.seed, step, gen.prompts_per_step).tolist())
    order = np.random.default_rng(np.random.SeedSequence([cfg.seed, step, refill, 11])).permutation(
        num_prompts)
    free = np.array([r for r in order if r not in taken], np.int64)
    mine = free[generator_index::gen.ranks]
    # NOTE: each round takes the next `count` of this generator's rows, so rounds differ
    return mine[(refill - 1) * count:refill * count]


class Generator:
    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.index = ctx.rank - ctx.placement.generator.first_rank
        self.engine = build_generation_engine(self.cfg.generator.backend, self.cfg.model.path,
                                              self.cfg, device=ctx.device)
        self.tokenizer = self.engine.tokenizer
        # a built-in task checks that the tokenizer spells it (char models)
        symbols = char_symbols(self.tokenizer) if self.cfg.task is not None else None
        self.sources = load_sources(self.cfg, symbols=symbols)
        self.receiver = NamedWeightReceiver(self.engine.weight_loader(), src=0,
                                            group=ctx.sync_group, device=self.engine.device)
        self.version = -1

    def _next_control(self, what: str, timeout_s: float | None = None) -> dict:
        """The next control message, checked: "sync" (weights follow) or "stop"."""
        message = self.ctx.control.recv(0, TAG_CONTROL, what, timeout_s)
        kind = message.get("kind")
        if kind not in CONTROL_KINDS or (kind == "sync" and "version" not in message):
            raise ProtocolError(f"{self.ctx.placement.describe_rank(self.ctx.rank)} waited for "
                                f"{what} and got an unexpected control message {message!r} "
                                f"(expected kind 'sync' with a version, or 'stop')")
        if kind == "sync":
            self.receiver.sync()
            self.version = int(message["version"])
            self.engine.policy_version = self.version
        return message

    def run(self) -> None:
        cfg = self.cfg
        # The first message is "sync" (with the step to generate from) — or "stop" when the
        # trainers found nothing left to train (a finished run started again).
        first = self._next_control("the initial weights", cfg.comm.startup_timeout_s)
        if first["kind"] == "stop":
            log.info("stopped before the first step: nothing left to generate")
            return
        if "generation_next_step" not in first:
            raise ProtocolError(f"the first sync message {first!r} names no "
                                f"generation_next_step")
        next_step = int(first["generation_next_step"])
        staleness = cfg.sync.max_staleness
        for step in range(next_step, cfg.trainer.steps):
            need = max(0, step - staleness)
            while self.version < need:
                if self._next_control(f"policy version {need}")["kind"] == "stop":
                    return
            self._publish(step)
        while self._next_control("the end of the run")["kind"] != "stop":
            pass

    def _publish(self, step: int) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        mine = generator_rows(cfg, len(self.sources.train), step, self.index)
        scored = step_rollouts(self.engine, self.sources, cfg, step, self.index, self.version,
                               mine)
        batch, time_reward = scored.batch, scored.time_reward_s
        time_sample = time.perf_counter() - start - time_reward
        info = write_shard(shard_path(self.ctx.run_dir, step, self.index), batch)
        elapsed = time.perf_counter() - start
        announcement = {"step": step, "generator": self.index, "path": info.path,
                        "checksum": info.checksum, "file_checksum": info.file_checksum,
                        "size_bytes": info.size_bytes,
                        "policy_version": self.version, "samples": len(batch),
                        "time_generate_s": elapsed, "time_sample_s": time_sample,
                        "time_reward_s": time_reward, "pid": os.getpid()}
        for trainer in self.ctx.placement.trainer.world_ranks():
            self.ctx.control.send(announcement, dest=trainer, tag=TAG_SHARD)
        log.info("step %d: published %s (version %d, %.2f s)", step, info.path, self.version,
                 elapsed)
