"""Resume at the boundaries: a finished run started again, and a kill at every instant.

Kills come from `hpcalign.faults` (HPCALIGN_FAULTS): each named point SIGKILLs the
trainer exactly there, once per RUN_DIR, so one chain of attempts with every point armed
crashes at each in turn and must still end bitwise equal to an uninterrupted run, with
every step logged once. `task.num_prompts=12` with 4 prompts a step makes an epoch of the
prompt order 3 steps long, so the crash after checkpoint 3 resumes exactly at an epoch
boundary (verl PR #5725's bug: it silently ran 0 steps there).
"""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from local_runs import (
    QUICKSTART,
    ROOT,
    TINY,
    assert_same_training,
    hpcalign_argv,
    run_to_end,
)

STEPS = 6
EPOCH = ["task.num_prompts=12", f"trainer.steps={STEPS}", "checkpoint.every_steps=3"]


def attempt(run_dir, faults: str | None, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HPCALIGN_FAULTS"}
    if faults:
        env["HPCALIGN_FAULTS"] = faults
    argv = hpcalign_argv("run", QUICKSTART, f"run_dir={run_dir}", *TINY, *EPOCH, *overrides)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("boundaries") / "reference"
    run_to_end(run_dir, *EPOCH)
    return run_dir


def assert_same_run(got, expected) -> None:
    assert_same_training(got, expected, STEPS)


def prompt_ids(run_dir, step: int) -> np.ndarray:
    path = os.path.join(run_dir, "rollouts", f"step-{step:06d}", "shard-0000.h5")
    with h5py.File(path, "r", locking=False) as f:
        return np.unique(f["prompt_ids"][()])


def test_finished_run_again_says_done_and_starts_no_step(reference):
    before = open(os.path.join(reference, "metrics.jsonl")).read()
    result = attempt(reference, None)
    assert result.returncode == 0, result.stderr[-3000:]
    final = os.path.join(reference, "checkpoints", f"step-{STEPS:06d}")
    assert f"run already finished at step {STEPS}" in result.stderr
    assert final in result.stderr
    assert open(os.path.join(reference, "metrics.jsonl")).read() == before
    status = subprocess.run(hpcalign_argv("status", str(reference)), capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert status.returncode == 0 and "state:      done" in status.stdout, status.stdout
    assert "owner:      none" in status.stdout


def test_roles_started_on_a_finished_run_stop_cleanly(reference, tmp_path):
    """Past the launcher (a Slurm step, a hand-made mpiexec): the trainer's first control
    message to the generators is "stop", which they obey (it was a KeyError)."""
    from hpcalign.launch.local import _find_mpiexec, mpiexec_command, run_mpiexec
    from hpcalign.launch.rundir import read_run_config

    cfg = read_run_config(str(reference))
    argv = mpiexec_command(cfg, str(reference), sys.executable, _find_mpiexec("mpiexec"),
                           as_root=os.geteuid() == 0)
    proc = run_mpiexec(argv, dict(os.environ, PRTE_MCA_ras="^slurm", PRTE_MCA_plm="^slurm"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.listdir(os.path.join(reference, "errors"))
    assert '"state": "done"' in open(os.path.join(reference, "state.json")).read()


def test_killed_at_every_boundary_resumes_bitwise(reference, tmp_path):
    run_dir = tmp_path / "chain"
    points = ["startup", "step@0", "checkpoint-write@3", "after-checkpoint@3",
              "checkpoint-write@6", "before-done"]
    outcomes = []
    for _ in range(len(points) + 2):
        result = attempt(run_dir, ",".join(points))
        outcomes.append(result.returncode)
        if result.returncode == 0:
            break
        assert "run failed" in result.stderr, result.stderr[-2000:]
    fired = sorted(os.listdir(run_dir / "faults"))
    expected = [*points[:-1], f"before-done@{STEPS}"]  # before-done fires at step STEPS
    assert fired == sorted(f"{p}.fired" for p in expected), fired
    assert outcomes[:-1] == [outcomes[0]] * len(points) and outcomes[-1] == 0, outcomes
    assert "run already finished" in result.stderr  # the last kill came after checkpoint 6
    assert_same_run(run_dir, reference)
    # resumed at the epoch boundary (checkpoint 3): steps 3..5 are the whole next epoch
    epoch1 = np.concatenate([prompt_ids(run_dir, s) for s in range(3, 6)])
    assert sorted(epoch1.tolist()) == list(range(12))
    status = subprocess.run(hpcalign_argv("status", str(run_dir)), capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert "state:      done" in status.stdout, status.stdout


def test_killed_while_writing_state_json_resumes(reference, tmp_path):
    """state.json is written twice a run ("running", "done"): a kill inside each write."""
    run_dir = tmp_path / "state-writes"
    faults = "write:state.json@1,write:state.json@2"
    codes = [attempt(run_dir, faults).returncode for _ in range(3)]
    assert codes[0] != 0 and codes[1] != 0 and codes[2] == 0, codes
    assert_same_run(run_dir, reference)
    leftovers = [n for n in os.listdir(run_dir) if ".tmp-" in n]
    assert leftovers == [] or all(n.startswith(".state.json.tmp-") for n in leftovers)


def test_make_run_twice(tmp_path):
    """`make run` on a finished run (the README's promise): the second says it is done."""
    run_dir = tmp_path / "make-run"
    args = " ".join([f"run_dir={run_dir}", *TINY, "trainer.steps=3"])
    for expected in ("run finished at step 3", "run already finished at step 3"):
        proc = subprocess.run(["make", "-s", "run", f"ARGS={args}"], capture_output=True,
                              text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert expected in proc.stderr, proc.stderr[-2000:]
