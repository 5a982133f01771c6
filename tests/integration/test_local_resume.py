"""Kill a real local run at a random step, resume it, and get bitwise the same result.

The reference is an uninterrupted run of the same config. "Same" means: every model and
optimizer tensor of the final checkpoint is bitwise equal, every step's rollout shard has
the same checksum (no rollout lost, duplicated or re-sampled differently), and
metrics.jsonl holds each step exactly once.
"""

import json
import random
import shutil
import signal
import subprocess

import pytest
import torch
from local_runs import (
    QUICKSTART,
    ROOT,
    TINY,
    checkpoint_tensors,
    hpcalign_argv,
    kill_job,
    metrics,
    run_to_end,
    shard_checksums,
    start_run,
    wait_for_step,
)

STEPS = 14


@pytest.mark.parametrize("staleness", [0, 1])
def test_killed_then_interrupted_run_resumes_bitwise(tmp_path, staleness):
    overrides = [f"sync.max_staleness={staleness}", f"trainer.steps={STEPS}"]
    reference = tmp_path / "reference"
    run_to_end(reference, *overrides)

    resumed = tmp_path / "resumed"
    rng = random.Random(staleness)
    # 1) SIGKILL the whole job at a random step: only periodic checkpoints survive
    proc = start_run(resumed, *overrides)
    wait_for_step(resumed, rng.randint(3, 5), proc)
    kill_job(proc)
    reached = max(row["step"] for row in metrics(resumed))
    # 2) resume, then Ctrl-C (graceful: checkpoint at the next step boundary)
    proc = start_run(resumed, *overrides)
    wait_for_step(resumed, reached + 1, proc, newer_than=reached)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped (resume: run it again)" in err
    # 3) resume to the end
    run_to_end(resumed, *overrides)

    expected = checkpoint_tensors(reference, STEPS)
    got = checkpoint_tensors(resumed, STEPS)
    assert expected.keys() == got.keys()
    unequal = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not unequal, f"tensors differ after resume: {unequal[:5]}"
    assert shard_checksums(resumed) == shard_checksums(reference)
    steps = [row["step"] for row in metrics(resumed)]
    assert steps == list(range(STEPS)), steps
    ref_rewards = [row["reward_mean"] for row in metrics(reference)]
    assert [row["reward_mean"] for row in metrics(resumed)] == ref_rewards


def test_resumed_trainer_checks_pending_shards_against_its_checkpoint(tmp_path):
    """A shard published before checkpoint c and trained on after it is verified against
    the whole-file checksum checkpoint c recorded, not only against the sidecar beside it:
    a valid shard of another run swapped in WITH its own sidecar is refused by name."""
    overrides = ["sync.max_staleness=1", "trainer.steps=6"]
    run, other = tmp_path / "run", tmp_path / "other"
    run_to_end(run, *overrides)
    run_to_end(other, *overrides, "seed=99")
    shard = run / "rollouts" / "step-000003" / "shard-0000.h5"
    sidecar = json.loads(shard.with_suffix(".json").read_text())
    state = json.loads((run / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["shards"] == {"3": {"0": sidecar["file_checksum"]}}

    shutil.rmtree(run / "checkpoints" / "step-000006")  # resume from checkpoint 3
    for suffix in (".h5", ".json"):
        foreign = other / "rollouts" / "step-000003" / f"shard-0000{suffix}"
        shutil.copyfile(foreign, shard.with_suffix(suffix))
    argv = hpcalign_argv("run", QUICKSTART, f"run_dir={run}", *TINY, *overrides)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    assert str(shard) in result.stderr and "checksum" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr.splitlines()[-1]
