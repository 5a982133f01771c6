"""Trainer role: read each step's shards, update the policy with GRPO, publish weights.

Order of one step k: wait for the shards of step k (announced over MPI, or already on
disk after a resume) → advantages over whole prompt groups → reference log-probs →
clipped policy loss + k3 KL → AdamW → broadcast version k+1 to generators → checkpoint
when due. A checkpoint at step c is only written once the shards of steps < c +
max_staleness are on disk, so a resumed generator never has to re-sample with a policy
version that no longer exists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpcalign import faults
from hpcalign.algorithms.grpo import group_advantages, grpo_loss, kl_k3, sft_loss
from hpcalign.comm.control import TAG_CONTROL, TAG_SHARD, TAG_TRAINERS
from hpcalign.comm.weights import WeightBroadcaster, allreduce_gradients
from hpcalign.data.rollout import bos_id, encode_prompt
from hpcalign.data.shards import RolloutBatch, read_shard, shard_path
from hpcalign.data.tasks import make_task, prompts_for_step
from hpcalign.durable import fsync_dir, fsync_tree
from hpcalign.errors import ProtocolError, ShardError
from hpcalign.launch.rundir import atomic_write_text
from hpcalign.metrics import MetricsWriter
from hpcalign.models.hf import load_model, save_model
from hpcalign.models.logprobs import pack_sequences, token_logprobs
from hpcalign.models.precision import autocast
from hpcalign.models.sampler import sample, seeded_generator
from hpcalign.roles.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from hpcalign.roles.context import RoleContext, restart_count

log = logging.getLogger(__name__)

SFT_SEED_OFFSET = 0x5F7  # the warm-up's prompt stream is independent of GRPO's


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A packed batch on the rank's device (a no-op on the CPU)."""
    return {key: value.to(device) for key, value in batch.items()}


def check_staleness(step: int, shard_step: int, policy_version: int, max_staleness: int,
                    path: str) -> None:
    """Refuse a shard of another step, or one sampled with a policy older than allowed."""
    lag = step - policy_version
    if shard_step != step or not 0 <= lag <= max_staleness:
        raise ShardError(path, f"sampled for step {shard_step} with policy version "
                               f"{policy_version}; training step {step} accepts versions "
                               f"{max(0, step - max_staleness)}..{step} "
                               f"(sync.max_staleness={max_staleness})")


class Trainer:
    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.index = ctx.rank  # trainers are world ranks 0..T-1
        self.is_leader = ctx.rank == 0
        self.task = make_task(self.cfg.task, self.cfg.seed)  # the generator checks symbols
        self.announced: dict[int, dict[int, dict[str, Any]]] = {}
        self.generators = ctx.placement.generator.world_ranks()

    # ----------------------------------------------------------------- setup
    def _reference_dir(self) -> str:
        """The frozen reference = the policy GRPO starts from (after the SFT warm-up)."""
        if self.cfg.trainer.sft_warmup_steps == 0:
            return self.cfg.model.path
        path = os.path.join(self.ctx.run_dir, "sft")
        need = torch.tensor([0.0 if os.path.isdir(path) else 1.0])
        if self.ctx.placement.trainer.ranks > 1:  # the leader's view decides for all
            dist.broadcast(need, src=0, group=self.ctx.trainer_group)
        if need.item():
            self._sft_warmup(path)
        return path

    def _sft_warmup(self, out_dir: str) -> None:
        """Short supervised warm-up on the task's answers; deterministic, saved once."""
        tcfg = self.cfg.trainer
        model, tokenizer = load_model(self.cfg.model.path, self.cfg.model.dtype)
        model.to(self.ctx.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.sft_lr)
        bos = bos_id(tokenizer)
        for step in range(tcfg.sft_warmup_steps):
            indices = prompts_for_step(self.task, step, tcfg.sft_batch,
                                       self.cfg.seed + SFT_SEED_OFFSET)
            prompts = [encode_prompt(tokenizer, bos, self.task.prompt(int(i))) for i in indices]
            answers = [[*tokenizer.encode(self.task.answer(int(i)), add_special_tokens=False),
                        tokenizer.eos_token_id] for i in indices]
            batch = _to(pack_sequences(prompts, answers, tokenizer.pad_token_id), self.ctx.device)
            with autocast(model, self.cfg.model.autocast):
                logp, _ = token_logprobs(model, batch)
            loss = sft_loss(logp, batch["completion_mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        log.info("SFT warm-up: %d steps, final loss %.4f", tcfg.sft_warmup_steps, loss.item())
        if self.is_leader:
            tmp = f"{out_dir}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(model, tokenizer, tmp)
            fsync_tree(tmp)
            os.replace(tmp, out_dir)
            fsync_dir(os.path.dirname(out_dir))
            for rank in self.ctx.placement.trainer.world_ranks()[1:]:
                self.ctx.control.send({"kind": "sft-saved", "path": out_dir}, dest=rank,
                                      tag=TAG_TRAINERS)
        else:  # every data-parallel trainer trained the same copy; the leader's is on disk
            self._wait_sft_saved()

    def _wait_sft_saved(self) -> None:
        """Other trainers: the leader's word that the warm-up model is on disk (bounded)."""
        message = self.ctx.control.recv(0, TAG_TRAINERS, "the saved SFT warm-up model",
                                        self.cfg.comm.startup_timeout_s)
        if message.get("kind") != "sft-saved":
            raise ProtocolError(f"{self.ctx.placement.describe_rank(self.ctx.rank)} waited for "
                                f"the saved SFT model and got {message!r}")

    def _setup(self) -> None:
        cfg = self.cfg
        ref_dir = self._reference_dir()
        self.policy, self.tokenizer = load_model(ref_dir, cfg.model.dtype)
        self.reference, _ = load_model(ref_dir, cfg.model.dtype)
        self.policy.to(self.ctx.device)
        self.reference.to(self.ctx.device).requires_grad_(False)
        self.policy.train()
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.trainer.lr,
                                           betas=tuple(cfg.trainer.betas),
                                           weight_decay=cfg.trainer.weight_decay)
        self.start_step, self.version = 0, 0
        self.generation_next_step = 0
        steps = list_checkpoints(self.ctx.run_dir)
        if steps:
            state = load_checkpoint(self.ctx.run_dir, steps[-1], self.policy, self.optimizer)
            self.start_step = int(state["step"])
            self.version = int(state["policy_version"])
            self.generation_next_step = int(state["generation_next_step"])
            log.info("resumed from checkpoint step %d", self.start_step)
        self.broadcaster = WeightBroadcaster(list(self.policy.parameters()), cfg.sync.bucket_mb,
                                             src=0, group=self.ctx.sync_group)
        self.metrics = MetricsWriter(self.ctx.run_dir, cfg.log.tensorboard) if self.is_leader else None

    # ------------------------------------------------------------ weight sync
    def _sync(self, version: int, extra: dict[str, Any] | None = None) -> float:
        """Tell every generator 'version v is ready', then broadcast it. Returns seconds."""
        start = time.perf_counter()
        if self.is_leader:
            for rank in self.generators:
                self.ctx.control.send({"kind": "sync", "version": version, **(extra or {})},
                                      dest=rank, tag=TAG_CONTROL)
            try:
                self.broadcaster.broadcast()
            except RuntimeError as err:  # name the peers, not only gloo's socket
                names = ", ".join(self.ctx.placement.describe_rank(r) for r in self.generators)
                raise RuntimeError(f"weight sync of policy version {version} to {names} "
                                   f"failed (one of them died or hung): {err}") from err
        return time.perf_counter() - start

    def _stop_generators(self) -> None:
        if self.is_leader:
            for rank in self.generators:
                self.ctx.control.send({"kind": "stop"}, dest=rank, tag=TAG_CONTROL)

    # ------------------------------------------------------------ rollouts
    def _wait_announced(self, step: int) -> dict[int, dict[str, Any]]:
        """Announcements of every generator for `step` (earlier ones are buffered)."""
        control = self.ctx.control
        while len(self.announced.get(step, {})) < len(self.generators):
            missing = [r for r in self.generators
                       if r - self.generators[0] not in self.announced.get(step, {})]
            message = control.recv(missing[0], TAG_SHARD, f"the shard of step {step}")
            self.announced.setdefault(message["step"], {})[message["generator"]] = message
        return self.announced[step]

    def _read_step(self, step: int) -> tuple[list[RolloutBatch], dict[str, float]]:
        """The step's batches and the generators' timings (slowest generator)."""
        if step < self.generation_next_step:  # published before the last checkpoint
            batches = [read_shard(shard_path(self.ctx.run_dir, step, g))
                       for g in range(len(self.generators))]
            return batches, {"time_generate_s": 0.0, "time_sample_s": 0.0}
        infos = self._wait_announced(step)
        del self.announced[step]
        batches = [read_shard(infos[g]["path"], expected_checksum=infos[g]["checksum"])
                   for g in sorted(infos)]
        return batches, {key: max(info[key] for info in infos.values())
                         for key in ("time_generate_s", "time_sample_s")}

    # ------------------------------------------------------------ update
    def _update(self, step: int, batches: list[RolloutBatch]) -> dict[str, float]:
        tcfg = self.cfg.trainer
        for g, batch in enumerate(batches):
            check_staleness(step, batch.step, batch.policy_version, self.cfg.sync.max_staleness,
                            shard_path(self.ctx.run_dir, step, g))
        prompt_ids = np.concatenate([b.prompt_ids for b in batches])
        rewards = torch.from_numpy(np.concatenate([b.rewards for b in batches]))
        prompts = [p for b in batches for p in b.prompt_tokens.to_list()]
        completions = [c for b in batches for c in b.completion_tokens.to_list()]
        old = [lp for b in batches for lp in b.logprobs.to_list()]
        advantages = group_advantages(rewards, torch.from_numpy(prompt_ids)).to(self.ctx.device)
        lengths = np.array([len(c) for c in completions])
        token_count = float(max(1, lengths.sum()))
        # data parallel: each trainer takes a contiguous slice of the whole batch
        mine = np.array_split(np.arange(len(completions)), self.ctx.placement.trainer.ranks)[self.index]
        micro = tcfg.micro_batch or max(1, len(mine))
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_frac": 0.0}
        for first in range(0, len(mine), micro):
            rows = mine[first:first + micro]
            batch = _to(pack_sequences([prompts[i] for i in rows], [completions[i] for i in rows],
                                       self.tokenizer.pad_token_id), self.ctx.device)
            mask = batch["completion_mask"]
            old_logp = torch.zeros(mask.shape, dtype=torch.float32)
            for row, i in enumerate(rows):
                start = len(prompts[i])
                old_logp[row, start:start + len(old[i])] = torch.from_numpy(old[i].astype(np.float32))
            old_logp = old_logp.to(self.ctx.device)
            precision = self.cfg.model.autocast
            with torch.no_grad(), autocast(self.reference, precision):
                ref_logp, _ = token_logprobs(self.reference, batch, self.cfg.generator.temperature)
            with autocast(self.policy, precision):
                logp, entropy = token_logprobs(self.policy, batch, self.cfg.generator.temperature,
                                               with_entropy=True)
            loss, parts = grpo_loss(logp, old_logp, ref_logp, advantages[rows], mask,
                                    clip_eps=tcfg.clip_eps, kl_coef=tcfg.kl_coef,
                                    token_count=token_count)
            loss.backward()
            faults.maybe_fire("step", step=step)
            with torch.no_grad():
                fmask = mask.to(logp.dtype)
                totals["loss"] += float(loss)
                totals["kl"] += float((kl_k3(logp, ref_logp) * fmask).sum()) / token_count
                totals["entropy"] += float((entropy * fmask).sum()) / token_count
                ntok = float(fmask.sum())
                totals["pg_loss"] += parts.get("pg_loss", 0.0) * ntok / token_count
                totals["clip_frac"] += parts.get("clip_frac", 0.0) * ntok / token_count
        if self.ctx.placement.trainer.ranks > 1:
            allreduce_gradients(self.params, self.ctx.trainer_group)
            summed = torch.tensor([totals[k] for k in sorted(totals)], dtype=torch.float64)
            dist.all_reduce(summed, group=self.ctx.trainer_group)
            totals = dict(zip(sorted(totals), summed.tolist()))
        grad_norm = float("nan")
        if tcfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, tcfg.grad_clip))
        self.optimizer.step()
        versions = np.array([b.policy_version for b in batches])
        finished = np.concatenate([b.finished for b in batches])
        return {
            **totals,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "reward_max": float(rewards.max()),
            "response_len_mean": float(lengths.mean()),
            "response_len_max": float(lengths.max()),
            "finished_frac": float(finished.mean()),
            "grad_norm": grad_norm,
            "staleness_mean": float((step - versions).mean()),
            "samples": float(len(completions)),
        }

    # ------------------------------------------------------------ eval
    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Greedy decoding on held-out prompts: exact-match rate and mean reward."""
        indices = list(self.task.eval_indices())
        if not indices:
            return {}
        bos = bos_id(self.tokenizer)
        prompts = [encode_prompt(self.tokenizer, bos, self.task.prompt(i)) for i in indices]
        self.policy.eval()
        with autocast(self.policy, self.cfg.model.autocast):
            out = sample(self.policy, prompts, max_new_tokens=self.cfg.generator.max_new_tokens,
                         temperature=1.0, top_k=1, eos_id=self.tokenizer.eos_token_id,
                         pad_id=self.tokenizer.pad_token_id,
                         generator=seeded_generator(self.policy, 0))
        self.policy.train()
        texts = self.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        rewards = [self.task.reward(i, t) for i, t in zip(indices, texts)]
        exact = [t == self.task.answer(i) for i, t in zip(indices, texts)]
        return {"eval_reward": float(np.mean(rewards)), "eval_exact": float(np.mean(exact))}

    # ------------------------------------------------------------ loop
    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.ctx.stop_signal else 0.0])
        if self.ctx.placement.trainer.ranks > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.trainer_group)
        return bool(flag.item())

    def _write_state(self, state: str, step: int, **extra: Any) -> None:
        if self.is_leader:
            body = {"state": state, "step": step, "policy_version": self.version,
                    "steps": self.cfg.trainer.steps, "restart_count": restart_count(),
                    "time": time.time(), **extra}
            atomic_write_text(os.path.join(self.ctx.run_dir, "state.json"), json.dumps(body) + "\n")

    def _checkpoint(self, step: int) -> None:
        if self.is_leader:
            staleness = self.cfg.sync.max_staleness
            save_checkpoint(self.ctx.run_dir, step, self.policy, self.tokenizer, self.optimizer,
                            {"step": step, "policy_version": self.version,
                             "generation_next_step": min(step + staleness, self.cfg.trainer.steps),
                             "seed": self.cfg.seed}, keep=self.cfg.checkpoint.keep)

    def run(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        self._setup()
        steps, staleness = cfg.trainer.steps, cfg.sync.max_staleness
        if self.start_step >= steps:  # a finished run started again: nothing to train
            log.info("checkpoint %d is final (trainer.steps=%d): nothing to train",
                     self.start_step, steps)
            self._stop_generators()
            self._write_state("done", self.start_step)
            return
        self._write_state("running", self.start_step)
        faults.maybe_fire("startup")
        self._sync(self.version, {"generation_next_step": max(self.generation_next_step,
                                                              self.start_step)})
        self.generation_next_step = max(self.generation_next_step, self.start_step)
        progress = self._progress()
        last = time.perf_counter()
        for step in range(self.start_step, steps):
            wait_start = time.perf_counter()
            batches, generator_times = self._read_step(step)
            train_start = time.perf_counter()
            metrics = self._update(step, batches)
            self.version = step + 1
            time_train = time.perf_counter() - train_start
            stop = self._stop_requested()
            time_sync = 0.0
            if not stop and self.version + staleness < steps:
                time_sync = self._sync(self.version)
            done = step + 1 == steps
            if stop:
                self._stop_generators()
            every = cfg.checkpoint.every_steps
            checkpoint_due = stop or done or bool(every and (step + 1) % every == 0)
            if checkpoint_due:
                # shards of steps < c + staleness must be on disk before checkpoint c
                for pending in range(step + 1, min(step + 1 + staleness, steps)):
                    if pending >= self.generation_next_step:
                        self._wait_announced(pending)
            now = time.perf_counter()
            metrics.update({
                "policy_version": float(self.version),
                "time_wait_s": train_start - wait_start,
                **generator_times,
                "time_train_s": time_train,
                "time_sync_s": time_sync,
                "time_step_s": now - last,
                "samples_per_s": metrics["samples"] / max(now - last, 1e-9),
                "restart_count": float(restart_count()),
            })
            last = now
            every_eval = cfg.log.eval_every_steps
            if self.is_leader and (done or (every_eval and (step + 1) % every_eval == 0)):
                metrics.update(self._evaluate())
            # NOTE: the step's metrics line is written BEFORE its checkpoint: a job killed
            # between the two redoes the step (and the writer drops the line), whereas the
            # other order would resume after a step whose line was never written.
            if self.metrics is not None:
                self.metrics.write(step, metrics)
            if checkpoint_due:
                self._checkpoint(step + 1)
                faults.maybe_fire("after-checkpoint", step=step + 1)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                                     kl=f"{metrics['kl']:.4f}",
                                     sps=f"{metrics['samples_per_s']:.0f}")
            if stop:
                log.info("stop requested (signal %s): checkpointed step %d", ctx.stop_signal, step + 1)
                self._write_state("preempted", step + 1, signal=ctx.stop_signal[-1])
                break
        else:
            self._stop_generators()
            faults.maybe_fire("before-done", step=steps)
            self._write_state("done", steps)
        if progress is not None:
            progress.close()
        if self.metrics is not None:
            self.metrics.close()

    def _progress(self) -> Any:
        if not (self.is_leader and self.cfg.log.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.trainer.steps, initial=self.start_step, unit="step",
                    desc="grpo", dynamic_ncols=True, mininterval=0.5,
                    disable=None if not os.environ.get("HPCALIGN_FORCE_PROGRESS") else False)
