"""Fault injection on the real test Slurm cluster: requeue, SIGTERM, the time-limit warning,
and slurmctld stopped under `hpcalign submit` / `hpcalign status`; prints ONE JSON line.

    tools/slurm-test-cluster up                         # root; the cluster the tests use
    python tools/faults/slurm_faults.py                 # the figure (~20 min on 2 cores)
    python tools/faults/slurm_faults.py --only ctld     # the integration test's sample (~1 min)

Every job is a real `hpcalign submit` (het job: trainer on partition train, generator on gen)
with the TINY overrides of tests/integration/local_runs.py. Faults (`--only` picks some):

- `requeue` (`--requeues` trials, default 3): `scontrol requeue JOB` at a random step, as
  an administrator or a preemption does. Slurm sends SIGTERM, kills, and starts the job
  again after its BeginTime (~1-2 min here); the run must complete bitwise equal to an
  uninterrupted reference job (final model + optimizer tensors, every step's metrics line
  once with the same rewards, every shard checksum).
- `sigterm`: `scancel --signal=TERM JOB` (to the job steps, i.e. the ranks, as
  docs/user-guide.md says they handle it): the ranks checkpoint and stop, the job script
  requeues itself, the run completes bitwise equal to the reference.
- `time_limit`: a real `--time` limit (3 min, warning 60 s before, sized in seconds as in
  tests/integration/test_slurm_grpo.py): the first attempt checkpoints and requeues
  itself; the second is stopped with `hpcalign cancel --checkpoint`; each step logged once.
- `ctld_submit`, `ctld_status`: slurmctld stopped, then `hpcalign submit` (a new run) and
  `hpcalign status` (of a running job): the command must end within its bound (the product's
  Slurm-command timeouts) with one named line, no traceback, no hang; `submit` must leave
  RUN_DIR unclaimed. Then slurmctld is started again (`tools/slurm-test-cluster up`) and
  the cluster must be healthy: `sinfo` answers, both nodes idle once the jobs are gone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from local_runs import QUICKSTART, TINY, hpcalign_argv, metrics  # noqa: E402
from preempt import compare  # noqa: E402

from hpcalign.launch.slurm import SLURM_TIMEOUT_S  # noqa: E402

CLUSTER = os.path.join(ROOT, "tools", "slurm-test-cluster")
STATE = os.environ.get("HPCALIGN_SLURM_STATE", "/var/lib/hpcalign-slurm-test")
CTLD_PID = os.path.join(STATE, "run", "slurmctld.pid")
STEPS = 20
# What the product promises with slurmctld down (hpcalign/launch/slurm.py): sbatch runs under
# `timeout --kill-after=10 4*SLURM_TIMEOUT_S`; status runs sacct, squeue, scontrol, each
# under SLURM_TIMEOUT_S. Plus start-up of the CLI.
SUBMIT_BOUND_S = 4 * SLURM_TIMEOUT_S + 10 + 15
STATUS_BOUND_S = 3 * SLURM_TIMEOUT_S + 15
FAULTS = ("requeue", "sigterm", "time_limit", "ctld_submit", "ctld_status")

_submitted: list[str] = []


# ---------------------------------------------------------------- Slurm helpers
def sh(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def hpcalign(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(hpcalign_argv(*args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def submit(run_dir: str, *overrides: str) -> str:
    proc = hpcalign("submit", QUICKSTART, f"run_dir={run_dir}", *TINY, *overrides)
    match = re.search(r"submitted job (\d+)", proc.stdout)
    if proc.returncode or not match:
        raise RuntimeError(f"submit failed: {proc.stderr[-2000:]}")
    _submitted.append(match.group(1))
    return match.group(1)


def poke(job_id: str) -> str:
    """The job's scontrol line; an eligible pending het job gets a no-op update (Slurm 22.05
    schedules het jobs only in backfill, which an idle cluster rarely runs: see docs/slurm.md)."""
    out = sh("scontrol", "-o", "show", "job", job_id).stdout
    if "JobState=PENDING" in out and "Reason=None" in out:
        sh("scontrol", "update", f"JobId={job_id}", "Nice=0")
    return out


def job_state(run_dir: str, job_id: str) -> str | None:
    """The folded state once the job is finished (submitit, het-aware watcher), else None."""
    from hpcalign.launch.slurm import HetSlurmJob

    handle = HetSlurmJob(folder=os.path.join(run_dir, "submitit"), job_id=job_id)
    return handle.state if handle.done(force_check=True) else None


def wait_done(run_dir: str, job_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(run_dir, job_id)
        if state:
            return state
        poke(job_id)
        time.sleep(1)
    sh("scancel", job_id)
    return "NOT DONE (cancelled)"


def wait_step(run_dir: str, step: int, restart: int = 0, timeout: float = 400) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step and int(r["restart_count"]) == restart for r in metrics(run_dir)):
            return True
        time.sleep(0.2)
    return False


def wait_restart(job_id: str, restarts: int, timeout: float = 300) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        out = poke(job_id)
        if f"Restarts={restarts}" in out and "JobState=RUNNING" in out:
            return round(time.monotonic() - began, 1)
        time.sleep(0.5)
    return None


def wait_file(path: str, job_id: str, timeout: float) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if os.path.exists(path):
            return round(time.monotonic() - began, 1)
        poke(job_id)
        time.sleep(0.5)
    return None


def outcome(run_dir: str, job_id: str, restart: int) -> dict | None:
    path = os.path.join(run_dir, "logs", f"slurm-{job_id}.{restart}-outcome.json")
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def restart_counts(run_dir: str) -> list[int]:
    return sorted({int(r["restart_count"]) for r in metrics(run_dir)})


# ---------------------------------------------------------------- slurmctld
def ctld_pid() -> int | None:
    try:
        pid = int(open(CTLD_PID).read().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def stop_ctld(timeout: float = 30) -> None:
    pid = ctld_pid()
    if pid is None:
        raise RuntimeError(f"no slurmctld (pid file {CTLD_PID}): is the test cluster up?")
    os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)


def start_ctld() -> dict:
    """`tools/slurm-test-cluster up` (starts only what is down), then check the cluster."""
    began = time.monotonic()
    proc = sh(CLUSTER, "up", timeout=180)
    return {"up_rc": proc.returncode, "up_s": round(time.monotonic() - began, 1),
            "up_tail": (proc.stderr.strip().splitlines() or [""])[-1]}


def healthy(timeout: float = 120) -> dict:
    """sinfo answers and both nodes are idle (no job of ours left)."""
    began = time.monotonic()
    states = ""
    while time.monotonic() - began < timeout:
        proc = sh("sinfo", "-h", "-N", "-o", "%N %t", timeout=15)
        states = " ".join(sorted(set(proc.stdout.split("\n")) - {""}))
        if proc.returncode == 0 and all(f"vm{n} idle" in states for n in (1, 2)):
            return {"healthy": True, "sinfo": states, "health_s": round(time.monotonic() - began, 1)}
        time.sleep(1)
    return {"healthy": False, "sinfo": states, "health_s": round(time.monotonic() - began, 1)}


def one_line_verdict(proc: subprocess.CompletedProcess, took: float, bound: float) -> dict:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"rc": proc.returncode, "verdict_s": round(took, 1), "bound_s": bound,
            "within_bound": took <= bound, "traceback": "Traceback" in proc.stderr,
            "error": lines[-1] if lines else "", "stderr_lines": len(lines)}


# ---------------------------------------------------------------- faults
def fault_requeue(work: str, reference: str, rng: random.Random, index: int) -> dict:
    run_dir = os.path.join(work, f"requeue-{index}")
    job_id = submit(run_dir, f"trainer.steps={STEPS}")
    step = rng.randint(2, 6)
    row: dict = {"fault": "requeue", "job": job_id, "step": step}
    if not wait_step(run_dir, step):
        row["problem"] = "never reached the step"
        return row
    row["logged_step_at_requeue"] = max(r["step"] for r in metrics(run_dir))
    requeued = time.monotonic()
    proc = sh("scontrol", "requeue", job_id)
    row["requeue_rc"] = proc.returncode
    row["restart_s"] = wait_restart(job_id, 1)
    row["state"] = wait_done(run_dir, job_id)
    row["total_s"] = round(time.monotonic() - requeued, 1)
    row["attempt0"] = (outcome(run_dir, job_id, 0) or {}).get("action")
    row["restarts"] = restart_counts(run_dir)
    difference = compare(run_dir, reference, STEPS) if row["state"] == "COMPLETED" else "not completed"
    row.update(bitwise=difference is None, difference=difference)
    return row


def fault_sigterm(work: str, reference: str, rng: random.Random) -> dict:
    run_dir = os.path.join(work, "sigterm")
    job_id = submit(run_dir, f"trainer.steps={STEPS}")
    step = rng.randint(2, 6)
    row: dict = {"fault": "sigterm", "job": job_id, "step": step,
                 "command": f"scancel --signal=TERM {job_id}"}
    if not wait_step(run_dir, step):
        row["problem"] = "never reached the step"
        return row
    sent = time.monotonic()
    row["scancel_rc"] = sh("scancel", "--signal=TERM", job_id).returncode
    record = os.path.join(run_dir, "logs", f"slurm-{job_id}.0-outcome.json")
    row["verdict_s"] = wait_file(record, job_id, 180)  # TERM -> the attempt's outcome recorded
    first = outcome(run_dir, job_id, 0) or {}
    row["attempt0"] = {k: first.get(k) for k in ("action", "state", "step", "failure")}
    row["restart_s"] = wait_restart(job_id, 1) if first.get("action") == "requeued" else None
    row["state"] = wait_done(run_dir, job_id)
    row["total_s"] = round(time.monotonic() - sent, 1)
    row["restarts"] = restart_counts(run_dir)
    difference = compare(run_dir, reference, STEPS) if row["state"] == "COMPLETED" else "not completed"
    row.update(bitwise=difference is None, difference=difference)
    return row


def fault_time_limit(work: str) -> dict:
    run_dir = os.path.join(work, "time-limit")
    began = time.monotonic()
    job_id = submit(run_dir, "trainer.steps=1000000", "checkpoint.every_steps=500",
                    "slurm.train.time_min=3", "slurm.gen.time_min=3",
                    "slurm.signal_before_end_s=60", "slurm.max_requeues=10")
    row: dict = {"fault": "time_limit", "job": job_id, "time_min": 3, "signal_before_end_s": 60}
    record = os.path.join(run_dir, "logs", f"slurm-{job_id}.0-outcome.json")
    if wait_file(record, job_id, 400) is None:
        row["problem"] = "the first attempt never ended"
        sh("scancel", job_id)
        return row
    row["attempt0_s"] = round(time.monotonic() - began, 1)
    first = outcome(run_dir, job_id, 0) or {}
    row["attempt0"] = {k: first.get(k) for k in ("action", "state", "step", "failure")}
    row["restart_s"] = wait_restart(job_id, 1)
    if row["restart_s"] is None or not wait_step(run_dir, int(first.get("step") or 0) + 1, 1):
        row["problem"] = "no second attempt training"
        sh("scancel", job_id)
        return row
    row["cancel"] = hpcalign("cancel", "--checkpoint", run_dir).stdout.strip()
    row["state"] = wait_done(run_dir, job_id, 300)
    second = outcome(run_dir, job_id, 1) or {}
    row["attempt1"] = {k: second.get(k) for k in ("action", "state", "step")}
    rows = metrics(run_dir)
    final = json.load(open(os.path.join(run_dir, "state.json")))
    row["steps_once"] = ([r["step"] for r in rows] == list(range(len(rows)))
                         and len(rows) == final.get("step"))
    row["restarts"] = restart_counts(run_dir)
    row["timeout_state"] = "TIMEOUT" in sh("sacct", "-X", "-n", "-P", "-j", job_id, "-o",
                                           "State").stdout
    row["ok"] = (first.get("action") == "requeued" and first.get("state") == "preempted"
                 and row["state"] == "COMPLETED" and row["steps_once"]
                 and row["restarts"] == [0, 1] and not row["timeout_state"])
    return row


def fault_ctld_submit(work: str) -> dict:
    run_dir = os.path.join(work, "ctld-submit")
    row: dict = {"fault": "ctld_submit", "command": "hpcalign submit"}
    stop_ctld()
    try:
        began = time.monotonic()
        proc = hpcalign("submit", QUICKSTART, f"run_dir={run_dir}", *TINY, "trainer.steps=2",
                        timeout=SUBMIT_BOUND_S + 120)
        row.update(one_line_verdict(proc, time.monotonic() - began, SUBMIT_BOUND_S))
        row["claim_released"] = not os.path.exists(os.path.join(run_dir, "owner.json"))
    finally:
        row.update(start_ctld())
    # the same RUN_DIR is accepted once the controller is back (no claim or file left
    # half-done); the job is cancelled at once, then the cluster must be idle and answer
    again = hpcalign("submit", QUICKSTART, f"run_dir={run_dir}", *TINY, "trainer.steps=2")
    match = re.search(r"submitted job (\d+)", again.stdout)
    row["resubmit_ok"] = bool(match)
    if match:
        _submitted.append(match.group(1))
        sh("scancel", match.group(1))
    else:
        row["resubmit_error"] = again.stderr.strip()[-500:]
    row.update(healthy())
    row["ok"] = (row["rc"] not in (0, None) and row["within_bound"] and not row["traceback"]
                 and row["stderr_lines"] == 1 and row["error"].startswith("hpcalign submit: error:")
                 and row["claim_released"] and row["healthy"] and row["resubmit_ok"])
    return row


def fault_ctld_status(work: str) -> dict:
    run_dir = os.path.join(work, "ctld-status")
    job_id = submit(run_dir, "trainer.steps=400")
    row: dict = {"fault": "ctld_status", "command": "hpcalign status (job running)", "job": job_id}
    if not wait_step(run_dir, 1):
        row["problem"] = "never reached step 1"
        sh("scancel", job_id)
        return row
    stop_ctld()
    try:
        began = time.monotonic()
        proc = hpcalign("status", run_dir, timeout=STATUS_BOUND_S + 120)
        row.update(one_line_verdict(proc, time.monotonic() - began, STATUS_BOUND_S))
        row["slurm_line"] = next((line for line in proc.stdout.splitlines()
                                  if line.startswith(("slurm:", "slurm said:"))), None)
        row["slurm_said"] = next((line for line in proc.stdout.splitlines()
                                  if line.startswith("slurm said:")), None)
        row["ran_on"] = wait_step(run_dir, 3, timeout=60)  # the job does not need slurmctld
    finally:
        row.update(start_ctld())
    row["cancel"] = hpcalign("cancel", run_dir).stdout.strip()
    row["job_state"] = wait_done(run_dir, job_id, 120)
    row.update(healthy())
    # accounting (slurmdbd) still answers, so the state is shown; the controller that did not
    # answer is named on its own line ("slurm said: 'scontrol ...' failed: ...")
    row["ok"] = (row["within_bound"] and not row["traceback"] and row["healthy"]
                 and row["slurm_line"] is not None and row["slurm_said"] is not None
                 and "controller" in row["slurm_said"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requeues", type=int, default=3, help="requeue trials (default 3)")
    parser.add_argument("--only", default=",".join(FAULTS),
                        help=f"comma-separated faults to run ({','.join(FAULTS)}; 'ctld' = "
                             f"both slurmctld ones)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir "
                        "under /tmp, which the test cluster's nodes share)")
    args = parser.parse_args()
    only = {name for item in args.only.split(",")
            for name in (("ctld_submit", "ctld_status") if item == "ctld" else (item,))}
    if only - set(FAULTS):
        parser.error(f"unknown fault(s): {sorted(only - set(FAULTS))}")

    began = time.perf_counter()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="hpcalign-slurm-faults-", dir=args.dir)
    os.chmod(work, 0o755)
    rows: list[dict] = []
    try:
        reference = None
        if only & {"requeue", "sigterm"}:
            reference = os.path.join(work, "reference")
            job_id = submit(reference, f"trainer.steps={STEPS}")
            state = wait_done(reference, job_id)
            if state != "COMPLETED":
                raise SystemExit(f"reference job {job_id} ended {state}")
        plan = [("requeue", i) for i in range(args.requeues if "requeue" in only else 0)]
        plan += [(name, 0) for name in FAULTS[1:] if name in only]
        for name, index in plan:
            try:
                if name == "requeue":
                    row = fault_requeue(work, reference, rng, index)
                elif name == "sigterm":
                    row = fault_sigterm(work, reference, rng)
                elif name == "time_limit":
                    row = fault_time_limit(work)
                elif name == "ctld_submit":
                    row = fault_ctld_submit(work)
                else:
                    row = fault_ctld_status(work)
            except Exception as err:  # a broken trial is a row, not the end of the figures
                row = {"fault": name, "problem": f"{type(err).__name__}: {err}"}
                if ctld_pid() is None:
                    row.update(start_ctld())
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress, per fault
    finally:
        for job_id in _submitted:
            sh("scancel", job_id)
        if ctld_pid() is None:
            start_ctld()
        shutil.rmtree(work, ignore_errors=True)
    resumed = [r for r in rows if r["fault"] in ("requeue", "sigterm")]
    ctld = [r for r in rows if r["fault"].startswith("ctld")]
    print(json.dumps({
        "faults": len(rows),
        "bitwise": f"{sum(bool(r.get('bitwise')) for r in resumed)}/{len(resumed)}",
        "time_limit_ok": next((r.get("ok") for r in rows if r["fault"] == "time_limit"), None),
        "ctld_ok": f"{sum(bool(r.get('ok')) for r in ctld)}/{len(ctld)}",
        "max_ctld_verdict_s": max((r["verdict_s"] for r in ctld if "verdict_s" in r),
                                  default=None),
        "rows": rows, "steps": STEPS, "seed": args.seed,
        "wall_s": round(time.perf_counter() - began, 1),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "slurm": sh("sinfo", "--version").stdout.strip(),
                    "load1": round(os.getloadavg()[0], 2)},
    }))


if __name__ == "__main__":
    main()
