"""Shared by the tests that need the test Slurm cluster (tools/slurm-test-cluster up)."""

from __future__ import annotations

import subprocess
import time

import pytest


def controller_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# `pytestmark = SLURM_ONLY` in a test module: marked `slurm`, skipped with the reason when no
# controller answers.
SLURM_ONLY = [pytest.mark.slurm, pytest.mark.skipif(
    not controller_up(), reason="no Slurm controller answers `sinfo` (run: tools/slurm-test-cluster up)")]


def sh(*argv: str, timeout: float = 30) -> str:
    """Run a Slurm command; its stdout, or a failed assertion with its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def poke_scheduler(job_id: str) -> str:
    """The job's `scontrol -o show job` line; an eligible pending job gets a no-op update.

    NOTE: Slurm 22.05 schedules het jobs only in backfill, and backfill runs only after
    some job/node/partition change. On the idle test cluster a het job (requeued and past
    its BeginTime, or new right after slurmctld restarted: CI saw a fresh one wait 180 s)
    can therefore wait minutes for an unrelated event; a busy cluster has such events all
    the time. A no-op `scontrol update` is that event.
    """
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                         text=True, timeout=30).stdout
    if "JobState=PENDING" in out and "Reason=None" in out:
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "Nice=0"], capture_output=True,
                       timeout=30)
    return out


def wait_gone(job_id: str, timeout: float = 300) -> None:
    """Until squeue no longer lists the job (poking the scheduler meanwhile); on time-out
    the job is cancelled and the failure shows what Slurm said of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sh("squeue", "-h", "-j", job_id).strip():
            return
        poke_scheduler(job_id)
        time.sleep(0.5)
    said = poke_scheduler(job_id)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t %E"], capture_output=True,
                           text=True, timeout=30).stdout
    sh("scancel", job_id)
    raise AssertionError(f"job {job_id} still queued after {timeout} s: {said.strip()}; "
                         f"nodes: {' | '.join(nodes.split(chr(10)))}")
