"""RUN_DIR ownership: one run at a time per directory, also where `flock` is unreliable.

Two runs on one RUN_DIR corrupt each other silently (the second resumes from the first's
checkpoint and both write metrics, shards and checkpoints). So whatever starts a run —
`hpcalign run`, `hpcalign submit`, the Slurm job script, `hpcalign rollout --out` — first
takes the claim `RUN_DIR/owner.json`, and writes nothing else in RUN_DIR before it holds it.

How, on NFS and Lustre (where `flock`/`fcntl` locks may be missing, local to a node, or
lost on a server restart): the record is written whole to a unique temp file, then
hard-linked to `owner.json`. `link(2)` is atomic on every POSIX and NFS filesystem and
fails if the name exists, so exactly one of several racing starters succeeds (the
classic NFS-safe lock recipe, open(2)'s note on O_EXCL over NFS).

The record names its holder: host, pid (and the pid's start time, so a reused pid is not
mistaken for the holder), Slurm job id, since when, and a heartbeat the local launcher
refreshes every `HEARTBEAT_S`. A claim is stale, and is taken over with a message, when
  - its Slurm job is no longer pending or running (squeue), for claims of Slurm jobs;
  - its pid is dead (or reused) on this host, for local claims made on this host;
  - its heartbeat is older than `STALE_AFTER_S`, for local claims of another host.
A Slurm job holds the claim for all its attempts: a requeued job (same job id) is the
same owner, and so are the tasks of one array job. `hpcalign submit` holds it as "submit"
until sbatch answers, then hands it to the job id; a job that starts before that handover
waits for it (bounded by `HANDOVER_S`).

    claim = take_claim(run_dir, "local")      # ClaimRefused (one line) if it is held
    claim.start_heartbeat()
    ...
    claim.release()
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from hpcalign.durable import atomic_write_text, fsync_dir, temp_name
from hpcalign.errors import UserError

OWNER_FILE = "owner.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0  # 12 missed heartbeats: a hung NFS client, not a slow one
HANDOVER_S = 120.0  # longest wait of a starting job for `hpcalign submit` to name it
SQUEUE_TIMEOUT_S = 30.0
_LIVE_SLURM_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED",
                      "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING",
                      "STAGE_OUT", "STOPPED"}


class ClaimRefused(UserError):
    """RUN_DIR belongs to another live run."""


@dataclass(frozen=True)
class Owner:
    """Who holds a RUN_DIR (the content of owner.json)."""

    kind: str  # local | submit | slurm | rollout
    host: str
    pid: int | None
    pid_start: str | None
    slurm_job_id: str | None
    since: float
    heartbeat: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    command: str = ""

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        if self.kind in ("slurm", "rollout") and self.slurm_job_id:
            who = f"Slurm job {self.slurm_job_id}"
        else:
            who = f"{'hpcalign submit' if self.kind == 'submit' else self.kind + ' run'} " \
                  f"pid {self.pid} on {self.host}"
            if self.slurm_job_id:
                who += f" (in Slurm job {self.slurm_job_id})"
        return f"{who}, since {since}"


def _pid_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (None where /proc has none)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def slurm_job_id_from_env(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The id that owns a claim inside Slurm: the array's job id for array tasks."""
    return env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID") or None


def this_owner(kind: str, pid: int | None = None) -> Owner:
    """The record a starter of `kind` writes for itself."""
    pid = os.getpid() if pid is None else pid
    now = time.time()
    job = slurm_job_id_from_env()
    return Owner(kind=kind, host=socket.gethostname(), pid=pid, pid_start=_pid_start(pid),
                 slurm_job_id=job, since=now, heartbeat=now,
                 command=" ".join(os.path.basename(a) if i == 0 else a
                                  for i, a in enumerate(sys.argv))[:300])


def owner_path(run_dir: str) -> str:
    return os.path.join(run_dir, OWNER_FILE)


def read_owner(run_dir: str) -> Owner | None:
    """The current holder, or None when RUN_DIR is free (or the record is unreadable)."""
    try:
        with open(owner_path(run_dir)) as handle:
            data = json.load(handle)
        return Owner(**data)
    except (OSError, ValueError, TypeError):
        return None


def _slurm_job_state(job_id: str) -> str | None:
    """'RUNNING', ... for a job Slurm still has; '' for a job it has not; None: no answer."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                              text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode:
        return "" if "Invalid job id" in proc.stderr else None
    states = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return states[0] if states else ""


def liveness(owner: Owner) -> tuple[bool, str]:
    """(alive, why) of a claim's holder, from the best evidence this host has."""
    if owner.kind in ("slurm", "rollout") and owner.slurm_job_id:
        state = _slurm_job_state(owner.slurm_job_id)
        if state is not None:
            alive = state in _LIVE_SLURM_STATES
            return alive, f"Slurm job {owner.slurm_job_id} is " + (
                state.lower() if state else "no longer in the queue")
    elif owner.host == socket.gethostname() and owner.pid:
        start = _pid_start(owner.pid)
        if start is None:
            return False, f"pid {owner.pid} is not running on {owner.host}"
        if owner.pid_start and start != owner.pid_start:
            return False, f"pid {owner.pid} on {owner.host} is another process now"
        return True, f"pid {owner.pid} is running on {owner.host}"
    age = time.time() - owner.heartbeat
    if age > STALE_AFTER_S:
        return False, f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
    return True, f"its heartbeat is {age:.0f} s old"


def same_owner(holder: Owner, me: Owner) -> bool:
    """A requeued job, a job after its submit handover, or tasks of one array job."""
    if holder.token == me.token:
        return True
    if me.kind in ("slurm", "rollout") and holder.kind == me.kind:
        return bool(me.slurm_job_id) and holder.slurm_job_id == me.slurm_job_id
    return False


def _refusal(run_dir: str, holder: Owner, why: str) -> ClaimRefused:
    return ClaimRefused(
        f"{run_dir} is in use by {holder.describe()} ({why}): wait for it to end, "
        f"stop it with `hpcalign cancel {run_dir}`, or choose another run_dir=")


class Claim:
    """A held claim: heartbeat, hand-over to a Slurm job, release."""

    def __init__(self, run_dir: str, owner: Owner) -> None:
        self.run_dir = run_dir
        self.owner = owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _still_mine(self) -> bool:
        current = read_owner(self.run_dir)
        return current is not None and current.token == self.owner.token

    def _rewrite(self, owner: Owner) -> None:
        if not self._still_mine():
            raise ClaimRefused(f"{self.run_dir}: the claim of this run was taken over "
                               f"(owner.json now names someone else); stopping")
        atomic_write_text(owner_path(self.run_dir), json.dumps(asdict(owner)) + "\n")
        self.owner = owner

    def start_heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        """Refresh the heartbeat from a daemon thread (other hosts judge staleness by it)."""
        def _beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    self._rewrite(replace(self.owner, heartbeat=time.time()))
                except (OSError, ClaimRefused):
                    return

        self._thread = threading.Thread(target=_beat, name="claim-heartbeat", daemon=True)
        self._thread.start()

    def hand_to_job(self, job_id: str) -> None:
        """`hpcalign submit`: the submitted job owns RUN_DIR from now on (all attempts)."""
        self._stop.set()
        self._rewrite(replace(self.owner, kind="slurm", slurm_job_id=str(job_id),
                              heartbeat=time.time()))

    def release(self) -> None:
        """Give RUN_DIR back (only if the claim is still this one's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._still_mine():
            try:
                os.unlink(owner_path(self.run_dir))
                fsync_dir(self.run_dir)
            except FileNotFoundError:
                pass


def _try_link(run_dir: str, owner: Owner) -> bool:
    """Create owner.json holding `owner` iff it does not exist (atomic on NFS too)."""
    path = owner_path(run_dir)
    tmp = temp_name(path)
    with open(tmp, "w") as handle:
        handle.write(json.dumps(asdict(owner)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
        linked = True
    except FileExistsError:
        linked = False
    except OSError:  # NFS: the reply may be lost although the link was made
        linked = os.stat(tmp).st_nlink == 2
    finally:
        os.unlink(tmp)
    if linked:
        fsync_dir(run_dir)
    return linked


def _take_over(run_dir: str, stale: Owner) -> bool:
    """Move a stale record aside; False if someone else changed it first."""
    path = owner_path(run_dir)
    aside = temp_name(path) + ".stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # released meanwhile
    try:
        with open(aside) as handle:
            moved = Owner(**json.load(handle))
    except (OSError, ValueError, TypeError):
        moved = None
    if moved is not None and moved.token != stale.token:
        # NOTE: another starter took it over and wrote a fresh claim between our read and
        # our rename: put theirs back (link fails only if a third one is faster still).
        try:
            os.link(aside, path)
        except OSError:
            pass
        os.unlink(aside)
        return False
    os.unlink(aside)
    return True


def take_claim(run_dir: str, kind: str, *, say=None, pid: int | None = None) -> Claim:
    """Claim RUN_DIR for this process (creating it, mode 0700), or raise ClaimRefused.

    `say` gets the one-line messages a user should see (a stale claim taken over).
    """
    say = say or (lambda message: print(f"hpcalign: {message}", file=sys.stderr, flush=True))
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    me = this_owner(kind, pid)
    handover_deadline = time.monotonic() + HANDOVER_S
    for _ in range(1000):  # bounded: each pass either wins, refuses, waits or takes over
        if _try_link(run_dir, me):
            return Claim(run_dir, me)
        holder = read_owner(run_dir)
        if holder is None:  # torn or vanished record: a writer in flight, or a release
            try:
                age = time.time() - os.stat(owner_path(run_dir)).st_mtime
            except FileNotFoundError:
                continue
            if age > STALE_AFTER_S:
                os.unlink(owner_path(run_dir))
                say(f"removed an unreadable claim {owner_path(run_dir)} ({age:.0f} s old)")
                continue
            time.sleep(0.2)
            continue
        if same_owner(holder, me):
            claim = Claim(run_dir, holder)
            claim._rewrite(replace(holder, pid=me.pid, pid_start=me.pid_start, host=me.host,
                                   heartbeat=time.time()))
            return claim
        alive, why = liveness(holder)
        if alive and holder.kind == "submit" and kind == "slurm" \
                and time.monotonic() < handover_deadline:
            time.sleep(1.0)  # `hpcalign submit` has not named its job yet
            continue
        if alive:
            raise _refusal(run_dir, holder, why)
        if _take_over(run_dir, holder):
            say(f"taking over the stale claim of {run_dir} by {holder.describe()} ({why})")
    raise ClaimRefused(f"{run_dir}: could not take the claim {owner_path(run_dir)} "
                       f"(it kept changing)")


def owner_status(run_dir: str) -> dict | None:
    """The holder and whether it is alive, for `hpcalign status` (None: no claim)."""
    holder = read_owner(run_dir)
    if holder is None:
        return None
    alive, why = liveness(holder)
    return {"holder": holder.describe(), "alive": alive, "why": why, **asdict(holder)}
