"""Generator role: sample the prompts of each step, score them, publish one HDF5 shard.

Step k is sampled with policy version max(0, k - max_staleness) exactly — never a fresher
one that happened to arrive early — so a run is reproducible bitwise whatever the timing,
and a resumed run samples what the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from hpcalign.comm.control import CONTROL_KINDS, TAG_CONTROL, TAG_SHARD
from hpcalign.comm.weights import WeightBroadcaster
from hpcalign.data.rollout import SamplingParams, sample_rollouts
from hpcalign.data.shards import shard_path, write_shard
from hpcalign.data.tasks import make_task, prompts_for_step
from hpcalign.errors import ProtocolError
from hpcalign.models.hf import load_model
from hpcalign.models.precision import autocast
from hpcalign.models.tokenizer import char_symbols
from hpcalign.roles.context import RoleContext, shard_seed

log = logging.getLogger(__name__)


class Generator:
    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.index = ctx.rank - ctx.placement.generator.first_rank
        self.model, self.tokenizer = load_model(self.cfg.model.path, self.cfg.model.dtype)
        self.model.to(ctx.device).requires_grad_(False)
        self.task = make_task(self.cfg.task, self.cfg.seed, symbols=char_symbols(self.tokenizer))
        self.receiver = WeightBroadcaster(list(self.model.parameters()), self.cfg.sync.bucket_mb,
                                          src=0, group=ctx.sync_group)
        self.version = -1
        gen = self.cfg.generator
        self.sampling = SamplingParams(samples_per_prompt=gen.samples_per_prompt,
                                       max_new_tokens=gen.max_new_tokens,
                                       temperature=gen.temperature, top_p=gen.top_p,
                                       top_k=gen.top_k, ignore_eos=gen.ignore_eos)

    def _next_control(self, what: str, timeout_s: float | None = None) -> dict:
        """The next control message, checked: "sync" (weights follow) or "stop"."""
        message = self.ctx.control.recv(0, TAG_CONTROL, what, timeout_s)
        kind = message.get("kind")
        if kind not in CONTROL_KINDS or (kind == "sync" and "version" not in message):
            raise ProtocolError(f"{self.ctx.placement.describe_rank(self.ctx.rank)} waited for "
                                f"{what} and got an unexpected control message {message!r} "
                                f"(expected kind 'sync' with a version, or 'stop')")
        if kind == "sync":
            self.receiver.broadcast()
            self.version = int(message["version"])
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
        cfg, gen = self.cfg, self.cfg.generator
        start = time.perf_counter()
        per_rank = gen.prompts_per_step // gen.ranks
        indices = prompts_for_step(self.task, step, gen.prompts_per_step, cfg.seed)
        mine = np.asarray(indices[self.index * per_rank:(self.index + 1) * per_rank], np.int64)
        with autocast(self.model, cfg.model.autocast):
            batch = sample_rollouts(self.model, self.tokenizer, self.task, mine, self.sampling,
                                    seed=shard_seed(cfg.seed, step, self.index), step=step,
                                    policy_version=self.version, generator_rank=self.index,
                                    attrs={"task": self.task.name})  # no timings: equal bytes
        time_sample = time.perf_counter() - start
        info = write_shard(shard_path(self.ctx.run_dir, step, self.index), batch)
        elapsed = time.perf_counter() - start
        announcement = {"step": step, "generator": self.index, "path": info.path,
                        "checksum": info.checksum, "size_bytes": info.size_bytes,
                        "policy_version": self.version, "samples": len(batch),
                        "time_generate_s": elapsed, "time_sample_s": time_sample,
                        "pid": os.getpid()}
        for trainer in self.ctx.placement.trainer.world_ranks():
            self.ctx.control.send(announcement, dest=trainer, tag=TAG_SHARD)
        log.info("step %d: published %s (version %d, %.2f s)", step, info.path, self.version,
                 elapsed)
