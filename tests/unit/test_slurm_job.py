"""In-job decisions (who failed) and the Slurm status reader's error paths.

The srun reports below were recorded on the test cluster: a generator killed with
`kill -9`, and a generator whose Python raised (it wrote errors/rank-1.json, MPI_Abort).
Fake `sacct`/`squeue` appear only for error paths: a controller that hangs or refuses.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hpcalign.launch import slurm
from hpcalign.launch.slurm_job import describe_rank, explain_failure, job_layout

KILLED = """\
srun: Job step aborted: Waiting up to 7 seconds for job step to finish.
srun: error: vm1: task 0: Killed
srun: launch/slurm: _step_signal: Terminating StepId=39.0
srun: launch/slurm: _step_signal: Terminating StepId=40.0
srun: error: vm2: task 0: Exited with exit code 14
"""
RAISED = """\
srun: Job step aborted: Waiting up to 7 seconds for job step to finish.
srun: error: vm2: task 0: Exited with exit code 1
srun: launch/slurm: _step_signal: Terminating StepId=74.0
srun: error: vm1: task 0: Killed
"""
# generators on vm1 in the first, on vm2 in the second: allocation order varies
HET_ENV_GEN_ON_VM1 = {"SLURM_HET_SIZE": "2", "SLURM_JOB_NODELIST_HET_GROUP_0": "vm2",
                      "SLURM_JOB_NODELIST_HET_GROUP_1": "vm1"}
HET_ENV_GEN_ON_VM2 = {"SLURM_HET_SIZE": "2", "SLURM_JOB_NODELIST_HET_GROUP_0": "vm1",
                      "SLURM_JOB_NODELIST_HET_GROUP_1": "vm2"}


def test_layout_and_names_from_slurm_environment() -> None:
    layout = job_layout(2, 3, {"SLURM_HET_SIZE": "2",
                               "SLURM_JOB_NODELIST_HET_GROUP_0": "gpu[01-02]",
                               "SLURM_JOB_NODELIST_HET_GROUP_1": "gen7"})
    assert [c.hosts for c in layout] == [("gpu01", "gpu02"), ("gen7",)]
    assert describe_rank(1, 2, layout) == "trainer 1 (world rank 1) in het component 0 (train)"
    assert describe_rank(4, 2, layout) == "generator 2 (world rank 4) in het component 1 (gen)"
    colocated = job_layout(1, 1, {"SLURM_JOB_NODELIST": "vm1"})
    assert describe_rank(1, 1, colocated) == "generator 0 (world rank 1) in component colocated"
    four = job_layout(1, 1, {"SLURM_HET_SIZE": "4", **{
        f"SLURM_JOB_NODELIST_HET_GROUP_{i}": f"vm{i + 1}" for i in range(4)}},
        models=(("reference", 1), ("reward", 2)))
    assert [(c.name, c.first_rank, c.hosts) for c in four] == [
        ("train", 0, ("vm1",)), ("gen", 1, ("vm2",)), ("reference", 2, ("vm3",)),
        ("reward", 3, ("vm4",))]
    assert describe_rank(4, 1, four) == "reward 1 (world rank 4) in het component 3 (reward)"


def test_killed_rank_is_named_from_srun_report(tmp_path: Path) -> None:
    line, record = explain_failure(str(tmp_path), 14, KILLED, 1, job_layout(1, 1, HET_ENV_GEN_ON_VM1))
    assert line.startswith("generator 0 (world rank 1) in het component 1 (gen) on vm1 died: Killed")
    assert record is not None and record["rank"] == 1 and record["component"] == 1


def test_own_error_record_wins(tmp_path: Path) -> None:
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "rank-1.json").write_text(json.dumps(
        {"rank": 1, "role": "generator 0 (world rank 1)", "host": "vm2",
         "error": "TypeError: boom", "time": time.time()}))
    line, record = explain_failure(str(tmp_path), 137, RAISED, 1, job_layout(1, 1, HET_ENV_GEN_ON_VM2))
    assert line == "generator 0 (world rank 1) in het component 1 (gen) on vm2 failed: TypeError: boom"
    assert record is None  # the rank's own record is already in errors/


def test_a_peer_seen_dying_is_no_root_cause_when_srun_names_the_killed_task(tmp_path: Path) -> None:
    """kill -9 of the generator: the trainer's "connection reset" record is secondary."""
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "rank-0.json").write_text(json.dumps(
        {"rank": 0, "role": "trainer 0 (world rank 0)", "host": "vm2", "secondary": True,
         "error": "RuntimeError: weight sync ... Connection reset by peer", "time": time.time()}))
    line, record = explain_failure(str(tmp_path), 137, KILLED, 1, job_layout(1, 1, HET_ENV_GEN_ON_VM1))
    assert line.startswith("generator 0 (world rank 1) in het component 1 (gen) on vm1 died: Killed")
    assert record is not None and record["rank"] == 1
    # without srun's word the secondary record is still better than nothing
    line, _ = explain_failure(str(tmp_path), 137, "", 1, job_layout(1, 1, HET_ENV_GEN_ON_VM1))
    assert line.startswith("trainer 0 (world rank 0)")


# what the last CI trial's srun printed: the trainer's exit line before the killed
# generator's (srun orders the lines of different components as they come)
EXITED_FIRST = """\
srun: error: vm1: task 0: Exited with exit code 14
srun: Job step aborted: Waiting up to 7 seconds for job step to finish.
srun: error: vm2: task 0: Killed
"""


def test_the_rank_without_a_record_is_named_whatever_srun_printed_first(tmp_path: Path) -> None:
    """The trainer (exit 14 after "connection reset", a secondary record) comes first in
    srun's log; the generator, killed by a signal, wrote nothing: it is the one named."""
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "rank-0.json").write_text(json.dumps(
        {"rank": 0, "role": "trainer 0 (world rank 0)", "host": "vm1", "secondary": True,
         "error": "RuntimeError: ... Connection reset by peer", "time": time.time()}))
    layout = job_layout(1, 1, HET_ENV_GEN_ON_VM2)
    line, record = explain_failure(str(tmp_path), 137, EXITED_FIRST, 1, layout)
    assert line.startswith("generator 0 (world rank 1) in het component 1 (gen) on vm2 died: "
                           "Killed"), line
    assert record is not None and record["rank"] == 1 and record["component"] == 1


def test_unexplained_failure_still_says_where_to_look(tmp_path: Path) -> None:
    line, record = explain_failure(str(tmp_path), 3, "", 1, job_layout(1, 1, HET_ENV_GEN_ON_VM2))
    assert "exited with status 3" in line and str(tmp_path) in line
    assert record is not None and record["rank"] is None


# ---------------------------------------------------------------- status error paths
def _fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sacct", "squeue", "scontrol"):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    slurm.write_job_record(str(run_dir), "123", "hpcalign submit")
    return run_dir


def test_status_reports_a_hung_controller_instead_of_waiting(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_bin(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(slurm, "SLURM_TIMEOUT_S", 0.5)
    started = time.monotonic()
    status = slurm.slurm_status(str(_run_dir(tmp_path)))
    assert time.monotonic() - started < 10
    assert status is not None and status["job_id"] == "123" and status["state"] == "UNKNOWN"
    assert "did not answer" in status["slurm_error"]


def test_status_reports_a_refusing_controller(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_bin(tmp_path, monkeypatch, 'echo "slurm_load_jobs error: Unable to contact" >&2; exit 1')
    status = slurm.slurm_status(str(_run_dir(tmp_path)))
    assert status is not None and "Unable to contact" in status["slurm_error"]


def test_status_of_a_run_dir_without_slurm_is_none(tmp_path: Path) -> None:
    assert slurm.slurm_status(str(tmp_path)) is None


def test_cancel_without_a_job_record_is_a_user_error(tmp_path: Path) -> None:
    from hpcalign.errors import UserError

    with pytest.raises(UserError, match="no slurm.json"):
        slurm.cancel_run(str(tmp_path))


def test_requeue_outcome_is_recorded_before_scontrol_kills_the_batch_shell(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`scontrol requeue` of its own job kills the batch shell at once (Slurm: "CANCELLED
    ... DUE TO JOB REQUEUE"): the stand-in kills after-step the same way, and the attempt's
    outcome must already be on disk, with no temp file left behind."""
    import subprocess
    import sys

    from hpcalign.config.load import load_config
    from hpcalign.launch.rundir import write_run_dir

    run_dir = tmp_path / "run"
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                   "quickstart.yaml"), [f"run_dir={run_dir}"])
    write_run_dir(cfg)
    (run_dir / "state.json").write_text(json.dumps({"state": "preempted", "step": 7}))
    _fake_bin(tmp_path, monkeypatch, 'kill -9 "$PPID"')  # scontrol kills its caller
    env = dict(os.environ, SLURM_JOB_ID="321", SLURM_RESTART_COUNT="0")
    proc = subprocess.run([sys.executable, "-m", "hpcalign.launch.slurm_job", "after-step",
                           "--rc", "0", str(run_dir)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # it really was killed inside the requeue
    outcome = json.loads((run_dir / "logs" / "slurm-321.0-outcome.json").read_text())
    assert outcome["action"] == "requeued" and outcome["step"] == 7
    assert [n for n in os.listdir(run_dir / "logs") if ".tmp-" in n] == []
