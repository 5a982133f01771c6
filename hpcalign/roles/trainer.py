"""Trainer role: read each step's shards, update the policy with GRPO, publish weights.

Order of one step k: wait for the shards of step k (announced over MPI, or already on
disk after a resume) → (dynamic sampling: drop groups without reward variance) →
reference log-probs → advantages over whole prompt groups (trainer.advantage_estimator,
the KL in the reward if asked) → clipped policy loss (+ KL) → AdamW,
trainer.updates_per_batch times → broadcast version k+1 to generators → checkpoint when
due. A checkpoint at step c is only written once the shards of steps < c + max_staleness
are on disk, so a resumed generator never has to re-sample with a policy
version that no longer exists.

The models are training engines (`hpcalign.engines`, `trainer.backend`): the policy (with
its optimizer, data parallel over the trainer group) and the frozen reference. This role
calls only their interface: pack, log-probs, one optimizer step from a loss function,
named weights for the sync, checkpoints, and a generation view for the greedy eval.
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
from hpcalign.algorithms.losses import sft_loss
from hpcalign.comm.control import TAG_CONTROL, TAG_MODEL, TAG_SHARD, TAG_TRAINERS
from hpcalign.data.datasets import filter_prompts, indices_for_step
from hpcalign.data.shards import RolloutBatch, read_shard, shard_path
from hpcalign.data.sources import ANSWER, load_sources, render
from hpcalign.durable import fsync_dir, fsync_tree
from hpcalign.engines import (
    OptimizerSpec,
    SamplingParams,
    build_training_engine,
)
from hpcalign.engines.rollouts import sample_and_score
from hpcalign.errors import ProtocolError, ShardError, UserError
from hpcalign.flows.api import Experience, FlowContext
from hpcalign.flows.registry import resolve_flow
from hpcalign.launch.rundir import atomic_write_text
from hpcalign.metrics import MetricsWriter
from hpcalign.rewards import TrainerState
from hpcalign.roles.checkpoint import checkpoint_dir, list_checkpoints
from hpcalign.roles.context import RoleContext, restart_count
from hpcalign.roles.update import reward_metrics

log = logging.getLogger(__name__)

SFT_SEED_OFFSET = 0x5F7  # the warm-up's prompt stream is independent of GRPO's


def answer_text(value: Any) -> str:
    """A dataset's answer value as the text the SFT warm-up trains on (4.0 -> "4")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def keep_forever(step: int, keep_every_steps: int) -> bool:
    """Whether checkpoint `step` is exempt from pruning (`checkpoint.keep_every_steps`)."""
    return keep_every_steps > 0 and step > 0 and step % keep_every_steps == 0


def check_staleness(step: int, shard_step: int, policy_version: int, max_staleness: int,
                    path: str) -> None:
    """Refuse a shard of another step, or one sampled with a policy older than allowed."""
    lag = step - policy_version
    if shard_step != step or not 0 <= lag <= max_staleness:
        raise ShardError(path, f"sampled for step {shard_step} with policy version "
                               f"{policy_version}; training step {step} accepts versions "
                               f"{max(0, step - max_staleness)}..{step} "
                               f"(sync.max_staleness={max_staleness})")


def _sft_loss_fn(_index: int, batch: dict[str, torch.Tensor], logp: torch.Tensor,
                 _entropy: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    loss = sft_loss(logp, batch["completion_mask"])
    return loss, {"loss": float(loss.detach())}


class Trainer:
    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.index = ctx.rank  # trainers are world ranks 0..T-1
        self.is_leader = ctx.rank == 0
        self.sources = load_sources(self.cfg)  # the generator checks a task's symbols
        self.announced: dict[int, dict[int, dict[str, Any]]] = {}
        # {step: {generator: whole-file checksum}} of shards published before the last
        # checkpoint, as that checkpoint recorded them: a resumed trainer verifies those
        # files against its own record, not only against the sidecar beside them
        self.recorded_shards: dict[int, dict[int, str]] = {}
        self.generators = ctx.placement.generator.world_ranks()
        self._eval_engine: Any = None  # the policy's generation view, made at the first eval

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

    def _prompt_tokens(self, tokenizer: Any, prompts: Any,
                       indices: Any) -> tuple[np.ndarray, list[list[int]], int]:
        """Rendered rows `indices` after data.max_prompt_tokens: (kept positions, ids, skipped)."""
        data = self.cfg.data
        return filter_prompts(render(tokenizer, prompts, indices), data.max_prompt_tokens,
                              data.truncation)

    def _sft_warmup(self, out_dir: str) -> None:
        """Short supervised warm-up on the dataset's answers; deterministic, saved once."""
        cfg, tcfg = self.cfg, self.cfg.trainer
        train = self.sources.train
        if ANSWER not in train.columns:
            raise UserError(f"trainer.sft_warmup_steps={tcfg.sft_warmup_steps} trains on the "
                            f"'{ANSWER}' column, which {train.path} does not have (columns: "
                            f"{', '.join(train.columns) or 'none'}); set trainer.sft_warmup_steps=0")
        # every data-parallel trainer trains the same copy: no data-parallel group here
        engine = build_training_engine(tcfg.backend, cfg.model.path, cfg, device=self.ctx.device,
                                       optimizer=OptimizerSpec(lr=tcfg.sft_lr))
        tokenizer = engine.tokenizer
        eos = (tokenizer.eos_token_id if tokenizer.eos_token_id is not None
               else engine.eos_token_ids[0])  # what ends an assistant turn in a chat model
        loss = float("nan")
        for step in range(tcfg.sft_warmup_steps):
            indices = indices_for_step(len(train), cfg.seed + SFT_SEED_OFFSET, step,
                                       tcfg.sft_batch)
            kept, prompts, _ = self._prompt_tokens(tokenizer, train, indices)
            if not prompts:
                continue
            answers = [[*tokenizer(answer_text(a), add_special_tokens=False).input_ids, eos]
                       for a in train.column_values(indices[kept])[ANSWER]]
            result = engine.train_step([engine.pack(prompts, answers)], _sft_loss_fn,
                                       temperature=1.0)
            loss = result.metrics["loss"]
        log.info("SFT warm-up: %d steps, final loss %.4f", tcfg.sft_warmup_steps, loss)
        if self.is_leader:
            tmp = f"{out_dir}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            engine.save_model(tmp)
            fsync_tree(tmp)
            os.replace(tmp, out_dir)
            fsync_dir(os.path.dirname(out_dir))
            faults.maybe_fire("sft-saved")
            for rank in self.ctx.placement.trainer.world_ranks()[1:]:
                self.ctx.control.send({"kind": "sft-saved", "path": out_dir}, dest=rank,
                                      tag=TAG_TRAINERS)
        else:  # every data-parallel trainer trained the same copy; the leader's is on disk
            if getattr(engine, "collective_weights", False):
                engine.save_model(out_dir)  # megatron: the leader's save gathers our shards
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
        tcfg = cfg.trainer
        ref_dir = self._reference_dir()
        spec = OptimizerSpec(lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay,
                             grad_clip=tcfg.grad_clip)
        self.policy = build_training_engine(tcfg.backend, ref_dir, cfg, device=self.ctx.device,
                                            optimizer=spec, dp_group=self.ctx.trainer_group,
                                            dp_size=self.ctx.placement.trainer.ranks)
        # the flow (cfg.algorithm) names the models it needs; it builds its others itself
        self.flow = resolve_flow(cfg.algorithm, cfg.flow)
        remote = self._exclusive_models(ref_dir)  # models.<name>.placement: exclusive
        self.reference = remote.get("reference")
        if self.reference is None and "reference" in self.flow.models:
            self.reference = build_training_engine(tcfg.backend, ref_dir, cfg,
                                                   device=self.ctx.device)
        self.reference_dir = ref_dir
        # data parallel: each replica takes a contiguous slice of the whole batch (megatron:
        # each data-parallel replica; its TP/PP ranks take the same slice)
        dp_size, dp_index, dp_group = getattr(self.policy, "data_parallel", (
            self.ctx.placement.trainer.ranks, self.index, self.ctx.trainer_group))
        models = {**remote, "policy": self.policy}
        if self.reference is not None:
            models["reference"] = self.reference
        self.flow.setup(FlowContext(
            cfg=cfg, models=models, device=self.ctx.device, run_dir=self.ctx.run_dir,
            reference_dir=ref_dir, trainer_ranks=self.ctx.placement.trainer.ranks,
            trainer_group=self.ctx.trainer_group, dp_size=dp_size, dp_index=dp_index,
            dp_group=dp_group, fault_hook=lambda step: faults.maybe_fire("step", step=step)))
        self.tokenizer = self.policy.tokenizer
        self.start_step, self.version = 0, 0
        self.generation_next_step = 0
        steps = list_checkpoints(self.ctx.run_dir)
        if steps:
            state = self.policy.load_checkpoint(self.ctx.run_dir, steps[-1])
            if self.flow.has_state:
                self.flow.restore(checkpoint_dir(self.ctx.run_dir, steps[-1]))
            self.start_step = int(state["step"])
            self.version = int(state["policy_version"])
            self.generation_next_step = int(state["generation_next_step"])
            self.recorded_shards = {int(k): {int(g): c for g, c in v.items()}
                                    for k, v in state.get("shards", {}).items()}
            log.info("resumed from checkpoint step %d", self.start_step)
        self.sender = self.policy.weight_sender(cfg.sync.bucket_mb, src=0,
                                                group=self.ctx.sync_group)
        self.metrics = MetricsWriter(self.ctx.run_dir, cfg.log.tensorboard) if self.is_leader else None

    def _exclusive_models(self, ref_dir: str) -> dict[str, Any]:
        """Handles on the models placed on ranks of their own (comm/model_service.py):
        this trainer's server of each; the reference's is told where its weights are."""
        from hpcalign.comm.model_service import RemoteModel, wire_device

        remote: dict[str, Any] = {}
        wire = wire_device(dist.get_backend(), self.ctx.device)
        for group in self.ctx.placement.models:
            server = group.first_rank + self.index % group.ranks
            remote[group.role] = RemoteModel(group.role, server, self.ctx.control, wire,
                                             self.ctx.device)
            if group.role == "reference":
                remote[group.role].load(ref_dir)
        return remote

    # ------------------------------------------------------------ weight sync
    def _sync(self, version: int, extra: dict[str, Any] | None = None) -> float:
        """Tell every generator 'version v is ready', then broadcast it. Returns seconds."""
        start = time.perf_counter()
        if self.is_leader:
            for rank in self.generators:
                self.ctx.control.send({"kind": "sync", "version": version, **(extra or {})},
                                      dest=rank, tag=TAG_CONTROL)
            try:
                self.sender.sync()
            except RuntimeError as err:  # name the peers, not only gloo's socket
                names = ", ".join(self.ctx.placement.describe_rank(r) for r in self.generators)
                raise RuntimeError(f"weight sync of policy version {version} to {names} "
                                   f"failed (one of them died or hung): {err}") from err
        elif getattr(self.policy, "collective_weights", False):
            self.sender.sync()  # megatron: this rank's shards travel through the leader
        return time.perf_counter() - start

    def _stop_generators(self) -> None:
        """The run is over for the generators and the exclusive models (their last
        requests of this step are answered: every trainer has passed its update)."""
        if self.is_leader:
            for rank in self.generators:
                self.ctx.control.send({"kind": "stop"}, dest=rank, tag=TAG_CONTROL)
            for group in self.ctx.placement.models:
                for rank in group.world_ranks():
                    self.ctx.control.send({"op": "stop"}, dest=rank, tag=TAG_MODEL)

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
            recorded = self.recorded_shards.pop(step, {})
            batches = [read_shard(shard_path(self.ctx.run_dir, step, g),
                                  expected_file_checksum=recorded.get(g))
                       for g in range(len(self.generators))]
            return batches, {"time_generate_s": 0.0, "time_sample_s": 0.0, "time_reward_s": 0.0}
        infos = self._wait_announced(step)
        del self.announced[step]
        batches = [read_shard(infos[g]["path"], expected_checksum=infos[g]["checksum"],
                              expected_file_checksum=infos[g].get("file_checksum"))
                   for g in sorted(infos)]
        return batches, {key: max(info.get(key, 0.0) for info in infos.values())
                         for key in ("time_generate_s", "time_sample_s", "time_reward_s")}

    # ------------------------------------------------------------ update
    def _update(self, step: int, batches: list[RolloutBatch]) -> dict[str, float]:
        for g, batch in enumerate(batches):
            check_staleness(step, batch.step, batch.policy_version, self.cfg.sync.max_staleness,
                            shard_path(self.ctx.run_dir, step, g))
        prompt_ids = np.concatenate([b.prompt_ids for b in batches])
        rewards = torch.from_numpy(np.concatenate([b.rewards for b in batches]))
        prompts = [p for b in batches for p in b.prompt_tokens.to_list()]
        completions = [c for b in batches for c in b.completion_tokens.to_list()]
        old = [lp for b in batches for lp in b.logprobs.to_list()]
        if not completions:  # every prompt of the step was over data.max_prompt_tokens
            nan = float("nan")  # no update: the policy stays as it is
            return {"samples": 0.0, "reward_mean": nan, "kl": nan, **self._shard_counts(batches)}
        lengths = np.array([len(c) for c in completions])
        out = self.flow.train(Experience(step, rewards, torch.from_numpy(prompt_ids), prompts,
                                         completions, old))
        result, family = out.result, out.metrics
        versions = np.array([b.policy_version for b in batches])
        finished = np.concatenate([b.finished for b in batches])
        scored = rewards[~torch.isnan(rewards)]
        return {
            **result.metrics,
            "reward_mean": float(scored.mean()),
            "reward_std": float(scored.std(unbiased=False)),
            "reward_max": float(scored.max()) if scored.numel() else float("nan"),
            **reward_metrics(batches),
            "response_len_mean": float(lengths.mean()),
            "response_len_max": float(lengths.max()),
            "finished_frac": float(finished.mean()),
            "grad_norm": result.grad_norm,
            "staleness_mean": float((step - versions).mean()),
            "samples": float(len(completions)),
            **family,
            **self._shard_counts(batches),
        }

    @staticmethod
    def _shard_counts(batches: list[RolloutBatch]) -> dict[str, float]:
        """Counts the generators recorded: prompts skipped (data.max_prompt_tokens), and
        samples no reward function applied to."""
        skipped = sum(int(b.attrs.get("prompts_skipped", 0)) for b in batches)
        unscored = sum(int(np.isnan(b.rewards).sum()) for b in batches)
        return {"prompts_skipped": float(skipped), "reward_unscored": float(unscored)}

    # ------------------------------------------------------------ eval
    def _evaluate(self, step: int) -> dict[str, float]:
        """Greedy decoding of the held-out prompts: mean reward (and exact match for a task)."""
        prompts = self.sources.eval
        if prompts is None:
            return {}
        if self._eval_engine is None or getattr(self.policy, "collective_weights", False):
            self._eval_engine = self.policy.generation_view()  # megatron: a refreshed copy
        greedy = SamplingParams(samples_per_prompt=1,
                                max_new_tokens=self.cfg.generator.max_new_tokens,
                                temperature=1.0, top_k=1)
        data = self.cfg.data
        scored = sample_and_score(
            self._eval_engine, prompts, self.sources.rewards, range(len(prompts)), greedy,
            seed=0, max_prompt_tokens=data.max_prompt_tokens, truncation=data.truncation,
            trainer_state=TrainerState(global_step=step + 1, max_steps=self.cfg.trainer.steps))
        batch = scored.batch
        if not len(batch):  # every held-out prompt is over data.max_prompt_tokens
            return {}
        scores = batch.rewards[~np.isnan(batch.rewards)].astype(np.float64)
        metrics = {"eval_reward": float(np.mean(scores)) if scores.size else float("nan")}
        per_function = dict(zip(batch.reward_names, batch.reward_values.T, strict=True))
        metrics.update({f"eval_{k}": v for k, v in self.sources.rewards.metrics(per_function).items()})
        if self.sources.task is not None:  # a built-in task: the answer is exact text
            answers = prompts.column_values(batch.prompt_ids)[ANSWER]
            metrics["eval_exact"] = float(np.mean([t == a for t, a in zip(scored.texts, answers)]))
        return metrics

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
        # megatron: every trainer rank saves its shards (rank 0's state is written)
        if self.is_leader or getattr(self.policy, "collective_weights", False):
            staleness = self.cfg.sync.max_staleness
            self.policy.save_checkpoint(
                self.ctx.run_dir, step,
                {"step": step, "policy_version": self.version,
                 "generation_next_step": min(step + staleness, self.cfg.trainer.steps),
                 "seed": self.cfg.seed, "shards": self._pending_shards(),
                 "keep": keep_forever(step, self.cfg.checkpoint.keep_every_steps)},
                keep=self.cfg.checkpoint.keep,
                **({"extra": self.flow.save} if self.flow.has_state else {}))

    def _pending_shards(self) -> dict[str, dict[str, str]]:
        """The whole-file checksums of the shards this checkpoint's resume will read from
        disk (published, not yet trained on): announced ones and ones still recorded."""
        pending = {step: dict(files) for step, files in self.recorded_shards.items()}
        for step, infos in self.announced.items():
            pending.setdefault(step, {}).update(
                {g: info["file_checksum"] for g, info in infos.items() if "file_checksum" in info})
        return {str(step): {str(g): c for g, c in sorted(files.items())}
                for step, files in sorted(pending.items())}

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
                metrics.update(self._evaluate(step))
            elif (done or (every_eval and (step + 1) % every_eval == 0)) and \
                    self.sources.eval is not None and getattr(self.policy, "collective_weights", False):
                self.policy.generation_view()  # megatron: the leader's eval copy needs our shards
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
