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
