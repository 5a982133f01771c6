"""The watcher that bounds the job script's wait on srun (hpcalign/launch/step_watch.py).

"srun" here is a real child process; the squeue answers are scripted so that each decision
(seen running, then gone for the grace period) is exercised. The real squeue is used by
tests/integration/test_slurm_grpo.py::test_step_watcher_stops_a_process_that_outlives_its_step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcalign.launch.slurm_job import after_step
from hpcalign.launch.step_watch import (
    component_job_ids,
    running_steps,
    stopped_record_path,
    watch_step,
)

ENV = {"SLURM_JOB_ID": "300", "SLURM_HET_SIZE": "2", "SLURM_RESTART_COUNT": "1"}


class Clock:
    """A fake clock the fake sleep advances: the loop's timing without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_srun():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def scripted(answers: list[list[str] | None]):
    """squeue answers in order; the last one repeats."""
    calls = []

    def query(job_ids: list[str]) -> list[str] | None:
        calls.append(job_ids)
        return answers[min(len(calls) - 1, len(answers) - 1)]

    return query, calls


def test_component_ids_are_consecutive_from_the_leader() -> None:
    assert component_job_ids(ENV) == ["300", "301"]
    assert component_job_ids({"SLURM_JOB_ID": "7"}) == ["7"]


def test_running_steps_skip_batch_extern_and_other_jobs() -> None:
    listing = ["300.batch", "300.extern", "300.0", "301.0", "3001.0", "30.0", "299.0"]
    assert running_steps(listing, ["300", "301"]) == ["300.0", "301.0"]
    assert running_steps(["300.batch"], ["300", "301"]) == []


def test_srun_outliving_its_step_is_stopped_after_the_grace(tmp_path: Path, fake_srun) -> None:
    (tmp_path / "logs").mkdir()
    clock = Clock()
    query, calls = scripted([[], ["300.0", "301.0"], ["300.0", "301.0"], []])
    stopped = watch_step(fake_srun.pid, str(tmp_path), ENV, poll_s=10, grace_s=20,
                         query=query, clock=clock, sleep=clock.sleep)
    assert stopped
    assert fake_srun.wait(timeout=15) == -15  # SIGTERM
    assert calls[0] == ["300", "301"]
    # gone first seen at the 4th poll (t=30); stopped once 20 s had passed with no step
    assert 50 <= clock.now <= 60
    record = json.loads(Path(stopped_record_path(str(tmp_path), ENV)).read_text())
    assert record["pid"] == fake_srun.pid and record["lingered_s"] >= 20
    assert Path(stopped_record_path(str(tmp_path), ENV)).name == "slurm-300.1-srun-stopped.json"


@pytest.mark.parametrize("answers", [[[]], [None], [["300.0"], None]],
                         ids=["no-step-yet", "squeue-silent", "seen-then-silent"])
def test_srun_still_starting_or_squeue_silent_is_left_alone(tmp_path: Path, fake_srun,
                                                            answers) -> None:
    """No step seen yet (srun still launching), or squeue not answering: never a kill."""
    clock = Clock()
    query, calls = scripted(answers)

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if len(calls) >= 50:  # srun ends on its own, much later
            fake_srun.terminate()
            fake_srun.wait()

    assert not watch_step(fake_srun.pid, str(tmp_path), ENV, poll_s=10, grace_s=20,
                          query=query, clock=clock, sleep=sleep)
    assert len(calls) == 50
    assert fake_srun.returncode == -15  # ended by the test, not by the watcher
    assert not Path(stopped_record_path(str(tmp_path), ENV)).exists()


def test_a_step_that_comes_back_resets_the_grace(tmp_path: Path, fake_srun) -> None:
    (tmp_path / "logs").mkdir()
    clock = Clock()
    # gone for less than the grace, back, then gone for good
    query, calls = scripted([["300.0"], [], ["300.0"], ["300.0"], []])
    assert watch_step(fake_srun.pid, str(tmp_path), ENV, poll_s=10, grace_s=20,
                      query=query, clock=clock, sleep=clock.sleep)
    assert len(calls) >= 9  # 5 scripted + at least 4 polls of the final 20 s


def test_after_step_trusts_the_run_state_when_the_watcher_stopped_srun(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """srun's status 143 came from the watcher: a finished run is still a finished run."""
    from hpcalign.config.load import load_config
    from hpcalign.launch.rundir import write_run_dir

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(str(repo / "configs" / "quickstart.yaml"), [f"run_dir={tmp_path / 'run'}"])
    write_run_dir(cfg)
    run_dir = str(tmp_path / "run")
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    (Path(run_dir) / "state.json").write_text(json.dumps({"state": "done", "step": 800}))
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    Path(stopped_record_path(run_dir, ENV)).write_text("{}")
    assert after_step(run_dir, 143) == 0
    outcome = json.loads((Path(run_dir) / "logs" / "slurm-300.1-outcome.json").read_text())
    assert outcome["action"] == "done" and outcome["srun_stopped"] and outcome["rc"] == 143
    # without the watcher's record the same status is a failure
    os.remove(stopped_record_path(run_dir, ENV))
    assert after_step(run_dir, 143) == 143
