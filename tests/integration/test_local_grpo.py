"""GRPO through the real roles: the policy learns, and data parallelism is exact."""

import json
import os
import stat

import torch
from local_runs import checkpoint_tensors, metrics, run_to_end


def test_data_parallel_trainers_match_a_single_trainer(tmp_path):
    """2 trainers (gradients all-reduced) = 1 trainer on the same rollouts (2 generators)."""
    common = ["generator.ranks=2", "trainer.steps=3", "checkpoint.every_steps=0"]
    run_to_end(tmp_path / "dp1", "trainer.ranks=1", *common)
    run_to_end(tmp_path / "dp2", "trainer.ranks=2", *common)
    one, two = checkpoint_tensors(tmp_path / "dp1", 3), checkpoint_tensors(tmp_path / "dp2", 3)
    for key in one:
        if key.startswith("model/"):
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    rewards = [r["reward_mean"] for r in metrics(tmp_path / "dp1")]
    assert [r["reward_mean"] for r in metrics(tmp_path / "dp2")] == rewards


def test_run_dir_layout_and_metrics(tmp_path):
    run_dir = tmp_path / "run"
    run_to_end(run_dir, "trainer.steps=4", "log.eval_every_steps=2", "log.tensorboard=true")
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    # private inside too (weights, rollouts, logs, config), whatever the caller's umask
    shared = [f"{oct(stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode))} {os.path.join(d, n)}"
              for d, dirs, files in os.walk(run_dir) for n in dirs + files
              if os.stat(os.path.join(d, n)).st_mode & 0o077]
    assert not shared, shared[:5]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "done" and state["step"] == 4
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_std", "loss", "kl", "entropy", "response_len_mean",
                "time_generate_s", "time_train_s", "time_sync_s", "samples_per_s"):
        assert key in rows[-1], key
    assert "eval_exact" in rows[1] and "eval_exact" in rows[3]
    assert rows[0]["kl"] == 0.0  # policy == reference before the first update
    assert all(r["samples"] == 16 for r in rows)
    assert os.listdir(run_dir / "tb")
    assert sorted(os.listdir(run_dir / "rollouts")) == [f"step-{k:06d}" for k in range(4)]


def test_grpo_learns_reverse(tmp_path):
    """The quickstart task at a reduced size: mean reward must clearly rise."""
    run_dir = tmp_path / "learn"
    run_to_end(run_dir, "model.init.hidden=128", "model.init.intermediate=512",
               "model.init.kv_heads=4", "generator.prompts_per_step=16",
               "generator.samples_per_prompt=8", "trainer.sft_warmup_steps=50",
               "trainer.sft_batch=64", "trainer.steps=150", "checkpoint.every_steps=0",
               timeout=900)
    rows = metrics(run_dir)
    first = sum(r["reward_mean"] for r in rows[:25]) / 25
    last = sum(r["reward_mean"] for r in rows[-25:]) / 25
    assert last > first + 0.05, (first, last)


def test_bf16_autocast_run_keeps_float32_state(tmp_path):
    """`model.autocast=bf16` through the real roles: it trains, and what is saved is float32."""
    run_dir = tmp_path / "bf16"
    run_to_end(run_dir, "trainer.steps=3", "model.autocast=bf16")
    assert json.loads((run_dir / "state.json").read_text())["state"] == "done"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r[k] == r[k] and abs(r[k]) < 1e6 for r in rows for k in ("loss", "kl", "entropy"))
    tensors = checkpoint_tensors(run_dir, 3)
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
