"""RUN_DIR claims (hpcalign/launch/claim.py): exclusive, named refusals, stale take-over."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from hpcalign.commands.cancel import cancel_local
from hpcalign.launch import claim as claim_mod
from hpcalign.launch.claim import (
    ClaimRefused,
    owner_path,
    owner_status,
    read_owner,
    same_owner,
    take_claim,
    this_owner,
)


def _quiet(_message: str) -> None:
    pass


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _write_owner(run_dir, **changes) -> None:
    owner = dataclasses.replace(this_owner("local"), **changes)
    os.makedirs(run_dir, exist_ok=True)
    with open(owner_path(str(run_dir)), "w") as handle:
        json.dump(dataclasses.asdict(owner), handle)


def test_second_claim_is_refused_naming_the_holder_and_changes_nothing(tmp_path):
    run_dir = str(tmp_path / "run")
    first = take_claim(run_dir, "local", say=_quiet)
    before = open(owner_path(run_dir)).read()
    with pytest.raises(ClaimRefused) as err:
        take_claim(run_dir, "local", say=_quiet, pid=os.getppid())
    message = str(err.value)
    assert f"pid {os.getpid()}" in message and first.owner.host in message
    assert "since " in message and "hpcalign cancel" in message and "run_dir=" in message
    assert "\n" not in message
    assert open(owner_path(run_dir)).read() == before
    assert sorted(os.listdir(run_dir)) == ["owner.json"]
    first.release()
    assert not os.path.exists(owner_path(run_dir))
    take_claim(run_dir, "local", say=_quiet).release()


def test_dead_pid_is_taken_over_with_a_message(tmp_path):
    proc = _sleeper()
    run_dir = str(tmp_path / "run")
    held = take_claim(run_dir, "local", say=_quiet, pid=proc.pid)
    proc.kill()
    proc.wait()
    said: list[str] = []
    mine = take_claim(run_dir, "local", say=said.append)
    assert mine.owner.pid == os.getpid() and read_owner(run_dir).token == mine.owner.token
    assert len(said) == 1 and "stale claim" in said[0] and f"pid {proc.pid}" in said[0]
    assert "not running" in said[0]
    held.release()  # the old holder's release must not drop the new claim
    assert read_owner(run_dir).token == mine.owner.token


def test_reused_pid_is_not_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    _write_owner(run_dir, pid=os.getpid(), pid_start="1")  # this pid, another start time
    said: list[str] = []
    take_claim(str(run_dir), "local", say=said.append)
    assert said and "another process now" in said[0]


def test_other_host_is_judged_by_its_heartbeat(tmp_path):
    run_dir = tmp_path / "run"
    _write_owner(run_dir, host="elsewhere", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(ClaimRefused, match="elsewhere"):
        take_claim(str(run_dir), "local", say=_quiet)
    _write_owner(run_dir, host="elsewhere", pid=1,
                 heartbeat=time.time() - claim_mod.STALE_AFTER_S - 1)
    said: list[str] = []
    take_claim(str(run_dir), "local", say=said.append)
    assert said and "heartbeat" in said[0]


def test_heartbeat_refreshes_the_record(tmp_path):
    run_dir = str(tmp_path / "run")
    held = take_claim(run_dir, "local", say=_quiet)
    first = read_owner(run_dir).heartbeat
    held.start_heartbeat(every_s=0.05)
    time.sleep(0.3)
    assert read_owner(run_dir).heartbeat > first
    held.release()


def test_a_requeued_job_and_the_submit_handover_are_the_same_owner(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    submit = take_claim(run_dir, "submit", say=_quiet)
    submit.hand_to_job("4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    job = take_claim(run_dir, "slurm", say=_quiet)  # the job's own claim: same owner
    assert job.owner.token == submit.owner.token and read_owner(run_dir).slurm_job_id == "4242"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    take_claim(run_dir, "slurm", say=_quiet)  # the requeued attempt: still the same owner
    other = dataclasses.replace(this_owner("slurm"), slurm_job_id="4343")
    assert not same_owner(read_owner(run_dir), other)
    assert not same_owner(read_owner(run_dir), this_owner("local"))  # a local run in it


def test_array_tasks_share_a_rollout_claim(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "out")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    take_claim(run_dir, "rollout", say=_quiet)
    monkeypatch.setenv("SLURM_JOB_ID", "79")  # another task of array 77
    take_claim(run_dir, "rollout", say=_quiet)
    assert read_owner(run_dir).slurm_job_id == "77"


def _race(run_dir: str, barrier, results) -> None:
    barrier.wait()
    try:
        take_claim(run_dir, "local", say=_quiet)
        results.put("won")
        time.sleep(1)  # hold it while the others try
    except ClaimRefused:
        results.put("refused")


def test_racing_starters_exactly_one_wins(tmp_path):
    run_dir = str(tmp_path / "run")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(run_dir, barrier, results)) for _ in range(6)]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=30) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    assert outcomes == ["refused"] * 5 + ["won"]


def test_status_and_cancel_of_a_local_owner(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c",
                             "import signal, sys, time\n"
                             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
                             "time.sleep(60)"])
    time.sleep(0.5)
    run_dir = str(tmp_path / "run")
    take_claim(run_dir, "local", say=_quiet, pid=proc.pid)
    status = owner_status(run_dir)
    assert status["alive"] and f"pid {proc.pid}" in status["holder"]
    message = cancel_local(run_dir)
    assert "SIGTERM" in message
    assert proc.wait(timeout=10) == 7  # the launcher treats SIGTERM like Ctrl-C
    assert owner_status(run_dir)["alive"] is False
    assert "nothing to cancel" in cancel_local(run_dir)
