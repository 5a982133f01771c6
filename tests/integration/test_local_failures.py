"""A dead or hung role ends the whole local job fast, with an error naming the rank."""

import os
import signal
import subprocess
import sys
import time

from local_runs import ROOT, role_pids, start_run, wait_for_step


def _kill_and_expect_named(proc, run_dir, role: str, named: str) -> None:
    """SIGKILL the run's one `role` rank: the job ends within 30 s, its error naming it."""
    (victim,) = role_pids(run_dir, role)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    _out, err = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 30, f"the job outlived its dead {role}"
    assert proc.returncode != 0
    assert named in err, err[-2000:]


def test_killed_generator_fails_fast_naming_the_rank(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir, "trainer.steps=200", "comm.timeout_s=120")
    wait_for_step(run_dir, 2, proc)
    _kill_and_expect_named(proc, run_dir, "generator", "generator 0 (world rank 1)")
    assert not role_pids(run_dir, "trainer"), "trainer left running"
    status = subprocess.run([sys.executable, "-m", "hpcalign.cli", "status", str(run_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert status.returncode == 1
    assert "generator 0 (world rank 1)" in status.stdout


def test_hung_generator_times_out_naming_the_rank(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir, "trainer.steps=200", "comm.timeout_s=4")
    wait_for_step(run_dir, 2, proc)
    (generator,) = role_pids(run_dir, "generator")
    os.kill(generator, signal.SIGSTOP)  # alive but silent: only a timeout can notice
    try:
        _out, err = proc.communicate(timeout=90)
    finally:
        try:
            os.kill(generator, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0
    assert "generator 0 (world rank 1)" in err, err[-2000:]
    # the trainer notices in its next wait: for the shard (an MPI message that never comes)
    # or inside the weight broadcast (a gloo collective that times out)
    assert ("sent nothing" in err and "trainer 0 (world rank 0)" in err) or (
        "weight sync" in err and "died or hung" in err), err[-2000:]


def test_killed_exclusive_reference_fails_fast_naming_the_model(tmp_path):
    """A model on a rank of its own (models.reference.placement=exclusive, world rank 2)
    killed mid-run: the job ends, and the error names that model and rank."""
    run_dir = tmp_path / "run"
    proc = start_run(run_dir, "trainer.steps=200", "comm.timeout_s=120",
                     "models.reference.placement=exclusive")
    wait_for_step(run_dir, 2, proc)
    _kill_and_expect_named(proc, run_dir, "reference", "reference 0 (world rank 2)")
    assert not role_pids(run_dir, "trainer") and not role_pids(run_dir, "generator")


def test_leader_silent_in_the_sft_hand_off_ends_the_job_naming_it(tmp_path):
    """Two data-parallel trainers: the leader saves the SFT warm-up model and then falls
    silent (a `sft-saved:pause` fault) instead of telling trainer 1 and the generators.
    Their bounded start-up waits end the job, naming the leader and what never came."""
    run_dir = tmp_path / "run"
    proc = start_run(run_dir, "trainer.ranks=2", "generator.ranks=2",
                     "trainer.sft_warmup_steps=2", "comm.startup_timeout_s=5",
                     faults="sft-saved:pause")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert (run_dir / "faults" / "sft-saved.paused").exists()  # it stopped where meant
    assert "from trainer 0 (world rank 0), which sent nothing" in err, err[-2000:]
    assert ("for the saved SFT warm-up model" in err or "for the initial weights" in err), \
        err[-2000:]
    assert "Traceback" not in err
