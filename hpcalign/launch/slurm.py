"""Slurm launcher: one heterogeneous job through submitit, its state, and cancelling it.

    hpcalign submit configs/grpo-7b.yaml      # -> submit_run()
    hpcalign status RUN_DIR                   # -> slurm_status() (called by commands/status)
    hpcalign cancel RUN_DIR                   # -> cancel_run()

submitit 1.5 has no heterogeneous jobs (one executor per job is its maintainers' advice).
It is extended at ONE point, `HetSlurmExecutor` (with its job class and state watcher):
see the class docstrings for the private functions they rely on. Everything the job runs
is in `hpcalign.launch.sbatch_text` (pure) and `hpcalign.launch.slurm_job` (in the job).

RUN_DIR/slurm.json records the job id, so status and cancel work from any login shell.
Every Slurm command runs with a timeout; a controller that does not answer is reported,
never waited on.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import submitit
from submitit.core import utils as submitit_utils
from submitit.slurm.slurm import SlurmExecutor, SlurmInfoWatcher, SlurmJob, _make_sbatch_string

from hpcalign.config.schema import Config
from hpcalign.errors import UserError
from hpcalign.launch.rundir import (
    atomic_write_text,
    finished_checkpoint,
    make_private_dir,
    prepare_model,
    read_json,
    write_run_dir,
)
from hpcalign.launch.sbatch_text import (
    COMPONENTS,
    component0_parameters,
    further_component_lines,
    hetjob_sbatch_text,
    insert_het_components,
    job_body,
    job_components,
    submitit_folder,
)

SUBMITIT_VERSION = "1.5.4"  # the private API below is checked against this version
SLURM_TIMEOUT_S = 30.0  # any single Slurm command; a busy controller answers in seconds
_UNFINISHED = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
               "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
_HET_ROW = re.compile(r"^(?P<job>\d+)\+(?P<offset>\d+)$")


def run_slurm(argv: list[str], timeout_s: float | None = None) -> str:
    """Run a Slurm client command; its stdout, or `UserError` naming the command and why."""
    timeout_s = SLURM_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise UserError(f"'{argv[0]}' not found: is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"'{' '.join(argv)}' did not answer within {timeout_s:.0f} s "
                        f"(is slurmctld/slurmdbd up?)") from None
    if proc.returncode:
        raise UserError(f"'{' '.join(argv)}' failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def fold_het_states(states: list[str]) -> str:
    """One state for a het job from its components' states (in component order).

    The first component that is not COMPLETED decides: a dead generator component makes
    the job FAILED/CANCELLED even if the trainers' batch script completed.
    """
    for state in states:
        if state.split()[0] != "COMPLETED":  # "CANCELLED by 0" -> "CANCELLED"
            return state.split()[0]
    return "COMPLETED" if states else "UNKNOWN"


class HetSlurmInfoWatcher(SlurmInfoWatcher):
    """submitit's sacct watcher, aware of heterogeneous jobs.

    `sacct` lists a het job only as `<id>+0`, `<id>+1` rows (no `<id>` row), so stock
    submitit finds no state for it: `job.state` stays UNKNOWN and `job.result()` waits
    forever when a component dies. `read_info` folds those rows into `<id>`
    (`fold_het_states`). `_make_command` adds a timeout to the sacct call.
    Relies on submitit 1.5.4's `SlurmInfoWatcher.read_info` returning a dict of row dicts
    keyed by the sacct JobID (steps skipped); golden-tested in tests/unit/test_sbatch_text.py.
    """

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        return None if command is None else ["timeout", str(int(SLURM_TIMEOUT_S)), *command]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        info = super().read_info(string)
        groups: dict[str, list[tuple[int, dict[str, str]]]] = {}
        for key, row in info.items():
            match = _HET_ROW.match(key)
            if match:
                groups.setdefault(match["job"], []).append((int(match["offset"]), row))
        for job_id, rows in groups.items():
            rows.sort(key=lambda item: item[0])
            folded = {"JobID": job_id,
                      "State": fold_het_states([row.get("State", "UNKNOWN") for _, row in rows]),
                      "NodeList": ",".join(row.get("NodeList", "") for _, row in rows)}
            for offset, row in rows:
                folded[f"State+{offset}"] = row.get("State", "UNKNOWN")
            info[job_id] = folded
        return info


class HetSlurmJob(SlurmJob):
    """A submitit SlurmJob whose state comes from `HetSlurmInfoWatcher`; cancel has a timeout."""

    watcher = HetSlurmInfoWatcher(delay_s=60)

    def cancel(self, check: bool = True) -> None:
        try:
            run_slurm(["scancel", str(self.job_id)])
        except UserError:
            if check:
                raise


class HetSlurmExecutor(SlurmExecutor):
    """submitit's SlurmExecutor that submits ONE heterogeneous job: THE extension point.

    Why a subclass: submitit writes one `#SBATCH` header (one component) and one srun per
    job. hpcalign needs `#SBATCH hetjob` components and one MPMD step across them. The
    subclass reuses submitit's own sbatch writer (`_make_sbatch_string`) for component 0 and
    the body, appends the further components, and submits with `_submit_command` (the job
    runs the rank entry in an MPMD step, not submitit's pickled entry: each component runs
    its own program and the roles handle USR1/SIGTERM themselves, which submitit's entry
    would intercept).

    Private submitit API used (pinned: submitit==1.5.4, see setup.cfg; the generated text
    is covered by golden tests, so a submitit upgrade that changes it fails loudly):
    `_make_sbatch_string`, `_as_sbatch_flag`, `_convert_mem`, `_internal_update_parameters`,
    `_submit_command`, and the overrides `_make_submission_file_text`, `_num_tasks`,
    `_make_submission_command` (adds a timeout to sbatch).
    """

    job_class = HetSlurmJob

    def __init__(self, cfg: Config, run_dir: str, python: str) -> None:
        if submitit.__version__ != SUBMITIT_VERSION:
            warnings.warn(f"hpcalign's het-job extension was checked against submitit "
                          f"{SUBMITIT_VERSION}, this is {submitit.__version__}: run the golden "
                          f"tests (tests/unit/test_sbatch_text.py)", stacklevel=2)
        super().__init__(submitit_folder(run_dir), max_num_timeout=cfg.slurm.max_requeues,
                         python=python)
        self.cfg, self.run_dir, self.python_path = cfg, run_dir, python
        self._internal_update_parameters(**component0_parameters(cfg))
        self._het_lines = further_component_lines(cfg)

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        text = _make_sbatch_string(command=command, folder=self.folder, **self.parameters)
        return insert_het_components(text, self._het_lines)

    def _num_tasks(self) -> int:
        return sum(ranks for *_, ranks in job_components(self.cfg))

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return ["timeout", "--kill-after=10", str(int(SLURM_TIMEOUT_S) * 4), "sbatch",
                str(submission_file_path)]

    def submit_run(self) -> HetSlurmJob:
        """sbatch the het job running `job_body`; returns the job (state, cancel)."""
        job = self._submit_command(job_body(self.cfg, self.run_dir, self.python_path))
        assert isinstance(job, HetSlurmJob)
        return job


def job_python(cfg: Config) -> str:
    """The interpreter the ranks run: `slurm.python`, or this one if left at "python".

    Like submitit's own default (`sys.executable`): on a cluster the submitting venv sits
    on the shared filesystem, and a bare `python` in a batch shell is rarely the right one.
    """
    import sys

    return sys.executable if cfg.slurm.python == "python" else cfg.slurm.python


def read_job_record(run_dir: str) -> dict[str, Any] | None:
    """RUN_DIR/slurm.json: which Slurm job runs this RUN_DIR (None: not a Slurm run)."""
    return read_json(os.path.join(run_dir, "slurm.json"))


def write_job_record(run_dir: str, job_id: str, how: str, cfg: Config | None = None) -> None:
    """Record the job id (and the component layout) for status and cancel."""
    named = ([(name, role) for name, role, *_ in job_components(cfg)] if cfg is not None
             else list(COMPONENTS))
    cfg_components = [{"component": i, "name": name, "role": role}
                      for i, (name, role) in enumerate(named)]
    record = {"job_id": str(job_id), "submitted_at": time.time(), "how": how,
              "components": cfg_components, "submitit_folder": submitit_folder(run_dir)}
    atomic_write_text(os.path.join(run_dir, "slurm.json"), json.dumps(record, indent=2) + "\n")


def _live_state(job_id: str) -> str | None:
    """The job's state if Slurm still knows it as unfinished, else None."""
    try:
        out = run_slurm(["squeue", "-h", "-j", job_id, "-o", "%T"])
    except UserError as err:
        if "Invalid job id" in str(err):
            return None
        raise
    states = [line.strip() for line in out.splitlines() if line.strip()]
    return states[0] if states else None


def submit_run(cfg: Config) -> tuple[str | None, str]:
    """Validate, claim and write RUN_DIR, submit the het job; returns (job id, RUN_DIR).

    The job id is None when the run had already finished (nothing is submitted). The
    claim passes to the job once sbatch has answered (hpcalign/launch/claim.py).
    """
    from hpcalign.launch.claim import take_claim
    from hpcalign.launch.local import say_finished
    run_dir = os.path.abspath(cfg.run_dir)
    python = job_python(cfg)
    hetjob_sbatch_text(cfg, run_dir, python)  # validates everything the text will hold
    claim = take_claim(run_dir, "submit")  # refused while a job or local run owns it
    try:
        final = finished_checkpoint(run_dir, cfg.trainer.steps)
        if final is not None:
            say_finished(run_dir, final)
            claim.release()
            return None, run_dir
        job_id = _submit_claimed(cfg, run_dir, python)
    except BaseException:
        claim.release()
        raise
    claim.hand_to_job(job_id)
    return job_id, run_dir


def _submit_claimed(cfg: Config, run_dir: str, python: str) -> str:
    prepare_model(cfg)
    write_run_dir(cfg)
    for name in os.listdir(os.path.join(run_dir, "errors")):  # an earlier attempt's failures
        os.remove(os.path.join(run_dir, "errors", name))
    make_private_dir(submitit_folder(run_dir))
    try:
        executor = HetSlurmExecutor(cfg, run_dir, python)
        # NOTE: submitit prints a failed sbatch's stderr itself; the UserError below carries
        # it, so the user gets one line ("sbatch refused the job: ..."), not the same twice.
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit_run()
    except submitit_utils.FailedJobError as err:
        raise UserError(f"sbatch refused the job: {str(err).strip() or err.__cause__}") from None
    except (RuntimeError, FileNotFoundError) as err:  # no srun/sbatch: not a Slurm login node
        raise UserError(f"cannot submit from this machine: {err} (--dry-run prints the "
                        f"script without Slurm)") from None
    write_job_record(run_dir, job.job_id, "hpcalign submit", cfg)
    return str(job.job_id)


def _sacct_rows(job_id: str) -> list[dict[str, str]]:
    fields = ["JobID", "Partition", "State", "ExitCode", "NodeList", "Elapsed", "Timelimit",
              "Reason"]
    out = run_slurm(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", ",".join(fields)])
    rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]
    return [r for r in rows if r["JobID"] == job_id or r["JobID"].startswith(f"{job_id}+")]


def _squeue_rows(job_id: str) -> list[dict[str, str]]:
    fields = ["JobID", "Partition", "State", "NodeList", "Elapsed", "Timelimit", "Reason"]
    out = run_slurm(["squeue", "-h", "-j", job_id, "-o", "%i|%P|%T|%N|%M|%l|%r"])
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def _restarts(job_id: str) -> int | None:
    try:
        out = run_slurm(["scontrol", "-o", "show", "job", job_id])
    except UserError as err:
        if "Invalid job id" in str(err):
            return None  # finished long ago: the controller forgot it
        raise  # no controller (sacct answers from slurmdbd): status says so
    match = re.search(r"\bRestarts=(\d+)", out)
    return int(match.group(1)) if match else None


def last_outcome(run_dir: str) -> dict[str, Any] | None:
    """The newest after-step record (RUN_DIR/logs/slurm-<job>.<restart>-outcome.json)."""
    logs = os.path.join(run_dir, "logs")
    names = [n for n in os.listdir(logs) if n.endswith("-outcome.json")] if os.path.isdir(
        logs) else []
    records = [r for r in (read_json(os.path.join(logs, n)) for n in names) if r]
    return max(records, key=lambda r: r.get("time", 0)) if records else None


def slurm_status(run_dir: str) -> dict[str, Any] | None:
    """The Slurm side of `hpcalign status`: job id, state per component, failure.

    None when RUN_DIR is not a Slurm run. Never raises for Slurm trouble: a controller
    that does not answer shows up as `slurm_error`.
    Keys: job_id, state (folded over components), components {name: "STATE on NODES"},
    details (one dict per component), restarts, failure (text or None), source, slurm_error.
    """
    record = read_job_record(run_dir)
    if not record:
        return None
    job_id = str(record["job_id"])
    status: dict[str, Any] = {"job_id": job_id, "state": "UNKNOWN", "components": {},
                              "details": [], "restarts": None, "failure": None,
                              "source": None, "slurm_error": None}
    rows: list[dict[str, str]] = []
    for source, reader in (("sacct", _sacct_rows), ("squeue", _squeue_rows)):
        try:
            rows = reader(job_id)
        except UserError as err:
            status["slurm_error"] = str(err)
            continue
        if rows:
            status["source"] = source
            break
    names = {str(c["component"]): c["name"] for c in record.get("components", [])}
    for row in sorted(rows, key=lambda r: r["JobID"]):
        offset = row["JobID"].partition("+")[2] or "0"
        name = names.get(offset, f"component {offset}") if "+" in row["JobID"] else "job"
        state = row["State"].split()[0] if row["State"] else "UNKNOWN"
        where = row.get("NodeList") or ""
        pending = state == "PENDING" and row.get("Reason") not in (None, "", "None")
        status["components"][name] = (f"{state} ({row['Reason']})" if pending
                                      else f"{state} on {where}" if where and where != "None"
                                      else state)
        status["details"].append({"component": name, **row})
    if rows:
        status["state"] = fold_het_states([r["State"] for r in sorted(rows,
                                                                      key=lambda r: r["JobID"])])
    if status["state"] in _UNFINISHED:
        try:
            status["restarts"] = _restarts(job_id)
        except UserError as err:
            status["slurm_error"] = str(err)
    outcome = last_outcome(run_dir)
    if outcome:
        status["last_attempt"] = outcome
        if status["restarts"] is None:
            status["restarts"] = outcome.get("restart")
        status["failure"] = outcome.get("failure")
    return status


def cancel_run(run_dir: str, checkpoint: bool = False) -> str:
    """scancel the run's job; with `checkpoint`, ask the ranks to checkpoint and stop first.

    The graceful form leaves a RUN_DIR/stop-requested marker (so after-step does not
    requeue) and sends USR1 to the job steps, exactly like the time-limit warning.
    """
    record = read_job_record(run_dir)
    if not record:
        raise UserError(f"{run_dir} has no slurm.json: it was not started by `hpcalign submit` "
                        f"or sbatch/*.sbatch")
    job_id = str(record["job_id"])
    state = _live_state(job_id)
    if state is None:
        return f"job {job_id} is not queued or running; nothing to cancel"
    if state == "COMPLETING":
        return f"job {job_id} is already ending (COMPLETING); nothing to cancel"
    if checkpoint:
        atomic_write_text(os.path.join(run_dir, "stop-requested"), f"{time.time()}\n")
        run_slurm(["scancel", "--signal=USR1", job_id])
        return f"job {job_id} ({state}): asked to checkpoint and stop (USR1)"
    HetSlurmJob(folder=submitit_folder(run_dir), job_id=job_id).cancel()
    return f"job {job_id} ({state}) cancelled"


