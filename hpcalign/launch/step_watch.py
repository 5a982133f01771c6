"""Bound the batch shell's wait on `srun`: stop an srun that outlives its own job step.

The job script runs the MPMD step as `srun ... &` and waits for it. Normally srun exits
within a second of its last task. On the test cluster (Slurm 22.05, a het step across two
components) an srun now and then stays alive after both components' steps have ended
(slurmd: "done with job"), after a USR1 checkpoint and after a plain finished run alike;
it ignores SIGTERM ("forcing job termination") and goes only on SIGKILL. Once, in CI, it
stayed until the job's time limit, so the script never reached `after-step`: a
checkpointed, preempted run timed out instead of requeueing itself. That wait must be
bounded like every other one.

`watch_step` polls `squeue --steps` for the job's steps (batch and extern steps aside). Once
it has seen a step running and then sees none for `grace_s`, it records
RUN_DIR/logs/slurm-<job>.<restart>-srun-stopped.json and stops srun (SIGTERM, then
SIGKILL). `after-step` reads that record: the tasks had all ended, so the run's own state
(state.json, error records) decides what happens next, not srun's exit status.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping

from hpcalign.launch.rundir import atomic_write_text

POLL_S = 10.0
GRACE_S = 20.0
SQUEUE_TIMEOUT_S = 30.0
_HOUSEKEEPING_STEPS = {"batch", "extern", "interactive"}


def component_job_ids(env: dict[str, str]) -> list[str]:
    """The job ids of every component: a het job's components have consecutive ids."""
    leader = int(env["SLURM_JOB_ID"])
    size = int(env.get("SLURM_HET_SIZE") or 1)
    return [str(leader + k) for k in range(size)]


def running_steps(squeue_ids: Iterable[str], job_ids: list[str]) -> list[str]:
    """The step ids ("301.0") of these jobs that run user work, from `squeue -s -o %i`."""
    steps = []
    for step_id in squeue_ids:
        job, _, step = step_id.strip().partition(".")
        if job in job_ids and step and step not in _HOUSEKEEPING_STEPS:
            steps.append(step_id.strip())
    return steps


def query_steps(job_ids: list[str]) -> list[str] | None:
    """The job's running step ids from squeue, or None when squeue did not answer."""
    try:
        proc = subprocess.run(["squeue", "-h", "-s", "-o", "%i", "-j", ",".join(job_ids)],
                              capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode:
        return None
    return running_steps(proc.stdout.split(), job_ids)


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by the shell, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stopped_record_path(run_dir: str, env: Mapping[str, str]) -> str:
    attempt = f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_RESTART_COUNT') or 0}"
    return os.path.join(run_dir, "logs", f"slurm-{attempt}-srun-stopped.json")


def watch_step(pid: int, run_dir: str, env: dict[str, str] | None = None,
               poll_s: float = POLL_S, grace_s: float = GRACE_S,
               query: Callable[[list[str]], list[str] | None] = query_steps,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> bool:
    """Until srun (`pid`) exits; stop it if it outlives its steps by `grace_s`.

    Returns True when it had to stop srun. `query`, `clock` and `sleep` are injectable so
    the decision is testable without a cluster; the job script uses the real ones.
    """
    env = dict(os.environ if env is None else env)
    job_ids = component_job_ids(env)
    seen_running = False
    gone_since: float | None = None
    while _alive(pid):
        steps = query(job_ids)
        now = clock()
        if steps:
            seen_running, gone_since = True, None
        elif steps is not None and seen_running:
            gone_since = now if gone_since is None else gone_since
            if now - gone_since >= grace_s:
                _stop(pid, run_dir, env, now - gone_since)
                return True
        sleep(poll_s if gone_since is None else min(poll_s, grace_s / 4))
    return False


def _stop(pid: int, run_dir: str, env: dict[str, str], lingered_s: float) -> None:
    record = {"pid": pid, "lingered_s": round(lingered_s, 1), "time": time.time(),
              "reason": "srun was still running after every task of its job step had ended"}
    atomic_write_text(stopped_record_path(run_dir, env), json.dumps(record) + "\n")
    print(f"hpcalign: srun (pid {pid}) still running {lingered_s:.0f} s after its job step "
          f"ended; stopping it", file=sys.stderr, flush=True)
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
