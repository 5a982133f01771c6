"""A real local GRPO run with a vLLM generator: `hpcalign run configs/grpo-vllm-tiny.yaml`.

mpiexec starts 1 trainer + 1 generator rank; the generator's vLLM runs in its rank beside
the run's torch.distributed world (engines/vllm_generation.py) and takes every policy
version through the weight sync. Skipped where vllm is not installed.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

pytest.importorskip("vllm")

from local_runs import ROOT, hpcalign_argv, metrics  # noqa: E402

from hpcalign.data.shards import read_shard, shard_path  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "grpo-vllm-tiny.yaml")
SHORT = ["trainer.sft_warmup_steps=5", "log.progress=false", "log.eval_every_steps=0",
         "log.tensorboard=false", "comm.timeout_s=240", "checkpoint.every_steps=0"]


def run(run_dir, *overrides: str) -> subprocess.CompletedProcess:
    argv = hpcalign_argv("run", CONFIG, f"run_dir={run_dir}", *SHORT, *overrides)
    return subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=ROOT)


def test_grpo_with_a_vllm_generator_and_one_step_of_staleness(tmp_path):
    steps = 4
    result = run(tmp_path, f"trainer.steps={steps}", "sync.max_staleness=1",
                 "trainer.max_logprob_mismatch=null")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(steps))
    # step 0 is on-policy: vLLM's log-probs are the trainer's (float32), the ratio is 1
    assert rows[0]["logprob_mismatch_max"] < 1e-4, rows[0]
    assert rows[0]["logprob_mismatch_mean"] < 1e-5
    assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    # later steps were sampled one version behind: the policy's change shows in the mismatch
    assert all(r["staleness_mean"] == 1.0 and r["logprob_mismatch_max"] > 1e-4 for r in rows[1:])
    # the overlap, in the per-phase timings: step k+1 was sampled while step k trained, so
    # the trainer waited for its shards less than their sampling took (at staleness 0 it
    # waits for all of it)
    wait = sum(r["time_wait_s"] for r in rows[1:])
    generate = sum(r["time_generate_s"] for r in rows[1:])
    assert wait < 0.9 * generate, [(r["time_wait_s"], r["time_generate_s"]) for r in rows]
    for step in range(steps):
        shard = read_shard(shard_path(str(tmp_path), step, 0))
        assert shard.policy_version == max(0, step - 1)
        ids, counts = np.unique(shard.prompt_ids, return_counts=True)
        assert len(ids) == 16 and set(counts.tolist()) == {8}  # 16 groups of 8 samples


def test_drift_beyond_the_threshold_is_a_named_error(tmp_path):
    result = run(tmp_path, "trainer.steps=1", "trainer.max_logprob_mismatch=1e-12",
                 "trainer.sft_warmup_steps=0")
    assert result.returncode != 0
    assert "LogprobMismatchError" in result.stderr and "max_logprob_mismatch" in result.stderr


def test_offline_rollout_with_vllm_same_samples_for_any_batch_size(tmp_path):
    """`hpcalign rollout --engine vllm`: per-sample seeds, one call per prompt group, so
    two batch sizes give the same tokens and log-probs (docs/rollout.md)."""
    import json

    from hpcalign.config.load import load_config
    from hpcalign.models.tiny import init_model

    model = str(tmp_path / "model")
    init_model(model, load_config(CONFIG, [f"run_dir={tmp_path}"]).model.init)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w + "=", "answer": w[::-1]}) + "\n"
                               for w in ["abc", "hello", "xy", "shard", "mpi"]))
    found = []
    for batch in ("1", "3"):
        out = tmp_path / f"out{batch}"
        done = subprocess.run(hpcalign_argv("rollout", "--engine", "vllm", "--checkpoint", model,
                                            "--prompts", str(prompts), "--out", str(out),
                                            "--samples-per-prompt", "2", "--max-new-tokens", "6",
                                            "--batch-size", batch),
                              capture_output=True, text=True, timeout=400, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        samples = {}
        for name in sorted(os.listdir(out)):
            if name.startswith("shard-") and name.endswith(".h5"):
                shard = read_shard(str(out / name))
                for i in range(len(shard)):
                    samples[int(shard.seeds[i])] = (shard.completion_tokens[i].tolist(),
                                                    shard.logprobs[i].tolist())
        found.append(samples)
    assert len(found[0]) == 10 and found[0] == found[1]


def test_a_megatron_trainer_syncs_into_vllm(tmp_path):
    """A TP=2 megatron-core trainer (its layer-by-layer resharding sync, HF names) and a
    vLLM generator in one run: on policy, every step's sampled log-probs as vLLM reports
    them equal the megatron trainer's own to 1e-4, so after each sync vLLM holds the
    trainer's weights, not the files' (the weights move every step: the mismatch would
    show). Skipped where megatron-core is not installed."""
    pytest.importorskip("megatron.core")
    megatron = os.path.join(ROOT, "configs", "grpo-megatron-tiny.yaml")
    vllm_keys = ["generator.backend=vllm", "generator.vllm.kv_cache_gb=0.25",
                 "generator.vllm.max_model_len=64", "generator.vllm.enforce_eager=true"]
    steps = 3
    argv = hpcalign_argv("run", megatron, f"run_dir={tmp_path}", *SHORT, *vllm_keys,
                         f"trainer.steps={steps}", "trainer.max_logprob_mismatch=1e-4")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(steps))
    assert all(r["logprob_mismatch_max"] < 1e-4 for r in rows), rows
    assert len({r["kl"] for r in rows[1:]}) == steps - 1 and rows[-1]["kl"] > 0  # it trained


@pytest.mark.parametrize("algorithm, keys", [
    ("online_dpo", {"pairs", "groups_without_preference"}),
    ("ppo", {"vf_loss", "score_mean", "kl_k1"}),
])
def test_the_other_online_flows_sample_with_vllm(tmp_path, algorithm, keys):
    """OnlineDPO and PPO take their experience from a vLLM generator like GRPO does (the
    flow is the trainer's part; shards are the same): two steps each, the second after a
    weight sync into vLLM, with the flow's own metrics."""
    result = run(tmp_path, f"algorithm={algorithm}", "trainer.steps=2",
                 "trainer.max_logprob_mismatch=null")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    assert keys <= rows[-1].keys(), sorted(rows[-1])
    assert read_shard(shard_path(str(tmp_path), 1, 0)).policy_version == 1
