"""Offline sampling IS the generator role's sampling: the role's own step function (over
`sample_and_score`, no I/O), given the policy a training step sampled from, its rows and
its seed, gives that step's shard byte for byte (docs/rollout.md, "Same sampling as
training"); `hpcalign rollout --replay RUN_DIR --step K` does it from the run alone."""

import os
import subprocess

import numpy as np
from local_runs import hpcalign_argv, run_to_end

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


def test_replay_regenerates_training_steps_bitwise_from_the_run_alone(tmp_path):
    """Steps 0 (the starting policy) and 3 (version 2, sampled one step stale, from the
    checkpoint keep_every_steps kept) replay bit for bit; step 2 needs version 1, whose
    checkpoint the retention policy pruned: a named error, not a silent other version."""
    run_dir = tmp_path / "run"
    run_to_end(run_dir, "trainer.steps=4", "sync.max_staleness=1", "checkpoint.every_steps=1",
               "checkpoint.keep=1", "checkpoint.keep_every_steps=2", "generator.ranks=2",
               "generator.prompts_per_step=8")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-000002", "step-000004"]

    def replay(step: int, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(hpcalign_argv("rollout", "--replay", str(run_dir), "--step",
                                            str(step), *extra),
                              capture_output=True, text=True, timeout=300)

    for step, version in ((0, 0), (3, 2)):
        done = replay(step, "--out", str(tmp_path / f"replay-{step}"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert (f"policy version {version}" in done.stdout
                and done.stdout.count("bitwise equal") == 2), done.stdout
        for generator in (0, 1):  # the replayed shards are the stored ones, byte for byte
            stored = shard_path(str(run_dir), step, generator)
            with open(stored, "rb") as a, open(shard_path(str(tmp_path / f"replay-{step}"),
                                                          step, generator), "rb") as b:
                assert a.read() == b.read()
    pruned = replay(2)
    assert pruned.returncode == 2
    assert "policy version 1 is in no checkpoint" in pruned.stderr
    assert "checkpoint.keep_every_steps" in pruned.stderr

    # the run directory is a rollout directory too: rescore it, then export it
    scored = subprocess.run(hpcalign_argv("rescore", str(run_dir),
                                          "reward.functions=[hpcalign.rewards.builtin:exact_match]"),
                            capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    exported = tmp_path / "run.jsonl"
    done = subprocess.run(hpcalign_argv("export", str(run_dir), "--out", str(exported)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import datasets

    rows = datasets.load_dataset("json", data_files=str(exported), split="train")
    assert len(rows) == 4 * 8 * 4  # steps x prompts per step x samples per prompt
    stored = read_shard(shard_path(str(run_dir), 3, 1))
    mine = [r for r in rows if r["step"] == 3 and r["seed"] == int(stored.seeds[0])]
    assert [r["completion_token_ids"] for r in mine] == [t.tolist() for t in
                                                          stored.completion_tokens.to_list()]
    assert mine and all(r["reward_exact_match"] == float(r["completion"].strip() == r["answer"])
                        for r in mine)  # the task's answer column, exported beside it
