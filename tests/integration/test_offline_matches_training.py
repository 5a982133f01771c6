"""Offline sampling IS the generator role's sampling: the role's own step function (over
`sample_and_score`, no I/O), given the policy a training step sampled from, its rows and
its seed, gives that step's shard byte for byte (docs/rollout.md, "Same sampling as
training")."""

import os

import numpy as np
from local_runs import run_to_end

from hpcalign.data.datasets import indices_for_step
from hpcalign.data.shards import read_shard, shard_path, write_shard
from hpcalign.data.sources import load_sources
from hpcalign.engines.torch_generation import TorchGenerationEngine
from hpcalign.launch.rundir import read_run_config
from hpcalign.models.hf import load_model
from hpcalign.roles.generator import step_rollouts


def test_step_zero_shard_equals_offline_sampling_of_its_policy(tmp_path):
    run_dir = tmp_path / "run"
    run_to_end(run_dir, "trainer.steps=2")
    cfg = read_run_config(str(run_dir))
    # policy version 0 = the model after the SFT warm-up, which the trainer saved here
    model, tokenizer = load_model(os.path.join(run_dir, "sft"))
    engine = TorchGenerationEngine(model.requires_grad_(False), tokenizer)
    sources = load_sources(cfg)
    rows = indices_for_step(len(sources.train), cfg.seed, 0, cfg.generator.prompts_per_step)
    scored = step_rollouts(engine, sources, cfg, 0, 0, 0, np.asarray(rows))
    stored_path = shard_path(str(run_dir), 0, 0)
    stored = read_shard(stored_path)
    assert np.array_equal(scored.batch.completion_tokens.flat, stored.completion_tokens.flat)
    assert np.array_equal(scored.batch.rewards, stored.rewards, equal_nan=True)
    offline = write_shard(str(tmp_path / "offline" / "shard-0000.h5"), scored.batch)
    with open(stored_path, "rb") as a, open(offline.path, "rb") as b:
        assert a.read() == b.read()  # byte for byte, so the checksums agree too
