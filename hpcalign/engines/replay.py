"""Replay a training step: regenerate the rollouts step K of a run sampled, and compare.

`hpcalign rollout --replay RUN_DIR --step K` answers "what exactly did step K train on,
and can I reproduce it?". Everything the generators used is in the run: the config
(`RUN_DIR/config.yaml`: seed, prompts, sampling, rewards), the prompt order
(`indices_for_step`), each generator's seed (`roles.context.shard_seed`) and the policy
version, max(0, K - sync.max_staleness), exactly (roles/generator.py). The weights of that
version are the starting policy for version 0 (`RUN_DIR/sft` after an SFT warm-up, else
`model.path`) and otherwise the checkpoint whose state records it (the steps
`checkpoint.keep_every_steps` keeps, and the newest `checkpoint.keep`). The replay runs
the generator role's own step function (`roles.generator.step_rollouts`), so on the same
kind of device it gives the stored shard's samples bit for bit; the report names the first
sample that differs otherwise.

    report = replay_step("runs/r1", 40, device=torch.device("cpu"))
    print(report.line()); report.ok
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from hpcalign.data.shards import RolloutBatch, read_shard, shard_path, write_shard
from hpcalign.errors import ShardError, UserError
from hpcalign.launch.rundir import checkpoint_dir, list_checkpoints, read_run_config

# the per-sample fields a replay compares, in the order a report names them
_FIELDS = ("prompt_ids", "prompt_tokens", "completion_tokens", "logprobs", "rewards", "seeds",
           "finished")


@dataclass
class GeneratorReplay:
    generator: int
    samples: int
    stored: str | None
    """The stored shard's path, None when the run has none for this generator."""
    difference: str | None = None
    """The first differing sample, None when bitwise equal (or nothing to compare)."""


@dataclass
class ReplayReport:
    step: int
    policy_version: int
    weights: str
    generators: list[GeneratorReplay] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(g.difference is None for g in self.generators)

    def line(self) -> str:
        parts = []
        for g in self.generators:
            if g.stored is None:
                parts.append(f"generator {g.generator}: {g.samples} samples (no stored shard)")
            elif g.difference is None:
                parts.append(f"generator {g.generator}: {g.samples} samples bitwise equal")
            else:
                parts.append(f"generator {g.generator}: DIFFERS: {g.difference}")
        return (f"replay of step {self.step} (policy version {self.policy_version}, "
                f"{self.weights}): " + "; ".join(parts))


def version_weights(run_dir: str, cfg, version: int) -> str:
    """The HF model directory holding policy version `version` of the run, or a UserError
    naming what is missing and how to keep it next time."""
    if version == 0:
        path = (cfg.model.path if cfg.trainer.sft_warmup_steps == 0
                else os.path.join(run_dir, "sft"))
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"policy version 0 of {run_dir} is the starting model {path}, "
                            "which is not there any more")
        return path
    found = []
    for step in list_checkpoints(run_dir):
        state_path = os.path.join(checkpoint_dir(run_dir, step), "state.json")
        try:
            with open(state_path) as f:
                held = int(json.load(f)["policy_version"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if held == version:
            return os.path.join(checkpoint_dir(run_dir, step), "model")
        found.append(held)
    kept = ", ".join(map(str, sorted(set(found)))) or "none"
    raise UserError(
        f"policy version {version} is in no checkpoint of {run_dir} (expected "
        f"{checkpoint_dir(run_dir, version)}; the kept checkpoints hold versions {kept}); "
        "checkpoints are pruned to the newest checkpoint.keep: set checkpoint.keep_every_steps "
        "to keep the versions you want to replay")


def first_difference(replayed: RolloutBatch, stored: RolloutBatch) -> str | None:
    """'sample 3 (prompt row 17): completion_tokens differ' for the first differing sample,
    or a count mismatch; None when every compared field is bitwise equal."""
    if len(replayed) != len(stored):
        return f"{len(replayed)} samples replayed, {len(stored)} stored"
    for i in range(len(stored)):
        for name in _FIELDS:
            a, b = getattr(replayed, name), getattr(stored, name)
            a, b = (a[i], b[i])
            if not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True):
                return f"sample {i} (prompt row {int(stored.prompt_ids[i])}): {name} differ"
    if replayed.reward_names != stored.reward_names:
        return f"reward functions {replayed.reward_names} vs stored {stored.reward_names}"
    return None


def replay_step(run_dir: str, step: int, *, device, engine_name: str | None = None,
                out_dir: str | None = None) -> ReplayReport:
    """Regenerate step `step` of the run in `run_dir` generator by generator, compare each
    with its stored shard, and write the replayed shards under `out_dir` if given."""
    from hpcalign.data.sources import load_sources
    from hpcalign.engines import build_generation_engine
    from hpcalign.models.tokenizer import char_symbols
    from hpcalign.roles.generator import generator_rows, step_rollouts

    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise UserError(f"--replay {run_dir}: not a run directory (no config.yaml)")
    cfg = read_run_config(run_dir)
    if not 0 <= step < cfg.trainer.steps:
        raise UserError(f"--step {step} is not a step of {run_dir} (0..{cfg.trainer.steps - 1})")
    import torch

    from hpcalign.plan.placement import compute_placement

    # the generator ranks' thread count: on CPU a sample's floats depend on it
    torch.set_num_threads(compute_placement(cfg).generator.threads)
    version = max(0, step - cfg.sync.max_staleness)
    weights = version_weights(run_dir, cfg, version)
    engine = build_generation_engine(engine_name or cfg.generator.backend, weights, cfg,
                                     device=device)
    engine.policy_version = version
    symbols = char_symbols(engine.tokenizer) if cfg.task is not None else None
    sources = load_sources(cfg, symbols=symbols)
    report = ReplayReport(step=step, policy_version=version, weights=weights)
    for generator in range(cfg.generator.ranks):
        rows = generator_rows(cfg, len(sources.train), step, generator)
        batch = step_rollouts(engine, sources, cfg, step, generator, version, rows).batch
        stored_path = shard_path(run_dir, step, generator)
        result = GeneratorReplay(generator=generator, samples=len(batch), stored=None)
        if os.path.exists(stored_path):
            result.stored = stored_path
            try:
                stored = read_shard(stored_path, retry_s=0)
            except ShardError as err:
                raise UserError(f"the stored shard cannot be compared: {err}") from err
            if stored.policy_version != version:
                result.difference = (f"the stored shard was sampled with policy version "
                                     f"{stored.policy_version}, the run's rule gives {version}")
            else:
                result.difference = first_difference(batch, stored)
        if out_dir is not None:
            write_shard(shard_path(out_dir, step, generator), batch)
        report.generators.append(result)
    return report
