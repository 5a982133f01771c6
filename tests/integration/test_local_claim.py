"""One run per RUN_DIR, with real local runs: a second start is refused, a stale claim
(a SIGKILLed job) is taken over, and the surviving run equals a lone run bitwise."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from local_runs import (
    ROOT,
    assert_same_training,
    hpcalign_argv,
    kill_job,
    run_to_end,
    start_run,
    wait_for_step,
)

STEPS = 10


@pytest.fixture(scope="module")
def lone(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("claim") / "lone"
    run_to_end(run_dir)
    return run_dir


def assert_equal_runs(got, expected) -> None:
    assert_same_training(got, expected, STEPS)


def test_second_run_on_a_live_run_dir_is_refused(lone, tmp_path):
    run_dir = tmp_path / "shared"
    # held after its step-3 checkpoint while the second start and `status` look at it (a
    # 10-step run may otherwise end first on a loaded machine), then let go
    first = start_run(run_dir, faults="after-checkpoint@3:pause")
    paused = run_dir / "faults" / "after-checkpoint@3.paused"
    deadline = time.monotonic() + 240
    while not paused.exists():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached its step-3 checkpoint"
        time.sleep(0.1)
    started = time.monotonic()
    second = subprocess.run(hpcalign_argv("run", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                          f"run_dir={run_dir}", "trainer.steps=10"),
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert time.monotonic() - started < 20  # at once, not after a run
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, second.stderr
    assert f"pid {first.pid}" in lines[0] and "hpcalign cancel" in lines[0], lines[0]
    assert "Traceback" not in second.stderr
    status = subprocess.run(hpcalign_argv("status", str(run_dir)), capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert f"local run pid {first.pid}" in status.stdout and ": alive" in status.stdout
    paused.unlink()
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert_equal_runs(run_dir, lone)
    assert not os.path.exists(run_dir / "owner.json")  # released at the end


def test_stale_claim_after_sigkill_is_taken_over(lone, tmp_path):
    run_dir = tmp_path / "killed"
    proc = start_run(run_dir)
    wait_for_step(run_dir, 4, proc)
    kill_job(proc)
    assert os.path.exists(run_dir / "owner.json")  # nobody could release it
    status = subprocess.run(hpcalign_argv("status", str(run_dir)), capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert "gone (stale claim)" in status.stdout and "interrupted" in status.stdout
    result = run_to_end(run_dir)
    assert "taking over the stale claim" in result.stderr
    assert f"pid {proc.pid}" in result.stderr
    assert_equal_runs(run_dir, lone)
