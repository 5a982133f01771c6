"""What runs inside the Slurm job besides the ranks: `prepare`, `claim` and `after-step`.

    python -m hpcalign.launch.slurm_job prepare [--colocated] CONFIG [key=value ...]
    python -m hpcalign.launch.slurm_job claim RUN_DIR
    python -m hpcalign.launch.slurm_job after-step --rc RC RUN_DIR

`claim` (the first line of the job step) takes RUN_DIR for this job id
(hpcalign/launch/claim.py): exit 0 to run, 1 when another live run owns it (the script
then changes nothing), 3 when the run has already finished (its final checkpoint exists:
the script goes straight to `after-step`, which records "done").

`prepare` is for the hand-written scripts in sbatch/: it validates the config against the
allocation the #SBATCH lines asked for, writes RUN_DIR (mode 0700) and slurm.json, and
prints shell assignments (every value `shlex.quote`d) that the script `eval`s:
HPCALIGN_RUN_DIR and the `export`s of `slurm.env`. `hpcalign submit` writes the same
values into the script itself.

`after-step` runs in the batch shell once the MPMD step has ended and decides what the
job does next, from RUN_DIR/state.json (written by the roles) and srun's exit status:
  * "done"                    -> exit 0;
  * "preempted" (USR1 before the time limit, or `hpcalign cancel --checkpoint`)
                              -> `scontrol requeue` while SLURM_RESTART_COUNT <
                                 slurm.max_requeues and no stop was requested; the
                                 requeued job resumes from RUN_DIR;
  * anything else             -> a failure: one line naming the rank, its role and its het
                                 component (from the rank's own errors/rank-N.json, else from
                                 srun's report of the task that died first), written to
                                 RUN_DIR/errors/job-<id>.json when no rank could write one,
                                 and the job exits non-zero.
Every attempt leaves RUN_DIR/logs/slurm-<job>.<restart>-outcome.json for `hpcalign status`,
and a job that will not run again (not requeued) releases its claim on RUN_DIR.

`watch-step --pid SRUN_PID RUN_DIR` runs beside srun and stops it if it outlives its own
job step (see hpcalign/launch/step_watch.py), so the wait for srun is bounded.
(A requeue by Slurm itself — `scontrol requeue`, preemption — kills the batch shell with
SIGTERM; the roles checkpoint on that SIGTERM and Slurm restarts the job on its own.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from hpcalign.durable import keep_private
from hpcalign.launch.rundir import atomic_write_text, read_json
from hpcalign.launch.step_watch import GRACE_S, POLL_S, stopped_record_path, watch_step

REQUEUE_TIMEOUT_S = 60.0
_SRUN_TASK_ERROR = re.compile(
    r"^srun: error: (?P<host>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)$", re.MULTILINE)


@dataclass(frozen=True)
class ComponentLayout:
    """One het component as the job sees it: its index, name, role, first world rank, hosts."""

    index: int
    name: str
    role: str
    first_rank: int
    ntasks: int
    hosts: tuple[str, ...]


def _expand_hosts(nodelist: str) -> tuple[str, ...]:
    from submitit.slurm.slurm import _parse_node_list  # "vm[1-2],gpu7" -> hosts

    return tuple(_parse_node_list(nodelist)) if nodelist else ()


def job_layout(trainer_ranks: int, generator_ranks: int,
               env: dict[str, str] | None = None,
               models: tuple[tuple[str, int], ...] = ()) -> list[ComponentLayout]:
    """The components of the running job, from Slurm's environment (het or colocated).

    `models`: (name, ranks) of the models on ranks of their own, one component each after
    the generators' (`sbatch_text.job_components`)."""
    env = dict(os.environ if env is None else env)
    if env.get("SLURM_HET_SIZE"):
        parts = [("train", "trainer", trainer_ranks), ("gen", "generator", generator_ranks),
                 *((name, name, ranks) for name, ranks in models)]
        layout, first = [], 0
        for index, (name, role, ranks) in enumerate(parts):
            hosts = _expand_hosts(env.get(f"SLURM_JOB_NODELIST_HET_GROUP_{index}", ""))
            layout.append(ComponentLayout(index, name, role, first, ranks, hosts))
            first += ranks
        return layout
    return [ComponentLayout(0, "colocated", "trainer+generator", 0,
                            trainer_ranks + generator_ranks,
                            _expand_hosts(env.get("SLURM_JOB_NODELIST", "")))]


def describe_rank(rank: int, trainer_ranks: int, layout: list[ComponentLayout]) -> str:
    """'generator 0 (world rank 2) in het component 1 (gen)'; 'reward 0 (world rank 3) in
    het component 2 (reward)' for a model on ranks of its own."""
    role = "trainer" if rank < trainer_ranks else "generator"
    index = rank if rank < trainer_ranks else rank - trainer_ranks
    comp = next((c for c in layout if c.first_rank <= rank < c.first_rank + c.ntasks), None)
    if comp is not None and comp.role not in ("trainer", "generator", "trainer+generator"):
        role, index = comp.role, rank - comp.first_rank
    where = ("" if comp is None else f" in het component {comp.index} ({comp.name})"
             if len(layout) > 1 else f" in component {comp.name}")
    return f"{role} {index} (world rank {rank}){where}"


def _first_task(tasks: str) -> int:
    return int(re.split(r"[,\-]", tasks)[0])


def explain_failure(run_dir: str, rc: int, srun_log: str, trainer_ranks: int,
                    layout: list[ComponentLayout]) -> tuple[str, dict | None]:
    """(one line naming who failed, a record for errors/job-<id>.json or None).

    The rank's own record wins (it has the Python error), unless it is `secondary` (the rank
    only saw a peer go away); a rank killed by a signal (kill -9, OOM killer) writes none,
    so srun's first "task N: Killed" line names it:
    srun numbers tasks within their component, and the host tells the component.
    """
    errors_dir = os.path.join(run_dir, "errors")
    records = []
    for name in sorted(os.listdir(errors_dir)) if os.path.isdir(errors_dir) else []:
        if name.startswith("rank-") and name.endswith(".json"):
            record = read_json(os.path.join(errors_dir, name))
            if record and isinstance(record.get("rank"), int):
                records.append(record)
    primary = [r for r in records if not r.get("secondary")]

    def world_rank(found: re.Match) -> tuple[int, ComponentLayout]:
        # srun numbers tasks within their component; the host tells the component (each
        # component of a het job has nodes of its own)
        comps = [c for c in layout if found["host"] in c.hosts] or layout[:1]
        return comps[0].first_rank + _first_task(found["tasks"]), comps[0]

    # NOTE: srun prints the task lines of different components in no fixed order: the
    # peer that exited after the death may come first. The rank that died by a signal is
    # the one that wrote no record (it could not), so its line wins.
    recorded = {r["rank"] for r in records}
    matches = list(_SRUN_TASK_ERROR.finditer(srun_log))
    match = next((m for m in matches if world_rank(m)[0] not in recorded),
                 matches[0] if matches else None)
    # a rank that merely saw its peer die ("connection reset") is no root cause when srun
    # names a task that died
    if primary or (records and not match):
        first = min(primary or records, key=lambda r: r.get("time", 0))
        who = describe_rank(first["rank"], trainer_ranks, layout)
        return f"{who} on {first.get('host')} failed: {first.get('error')}", None
    if match:
        host, what = match["host"], match["what"].strip()
        rank, comp = world_rank(match)
        who = describe_rank(rank, trainer_ranks, layout)
        line = (f"{who} on {host} died: {what} (no error report from the rank: killed by a "
                f"signal, e.g. the OOM killer or kill -9)")
        record = {"rank": rank, "role": who, "host": host, "error": f"died: {what}",
                  "component": comp.index, "time": time.time(),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        return line, record
    line = f"the job step exited with status {rc} without naming a rank; see {run_dir}/logs"
    return line, {"rank": None, "role": "job step", "host": os.uname().nodename,
                  "error": f"exit status {rc}", "time": time.time(),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def _say(message: str) -> None:
    print(f"hpcalign: {message}", file=sys.stderr, flush=True)


def after_step(run_dir: str, rc: int) -> int:
    """Decide done / requeue / failed after the MPMD step; returns the job's exit status."""
    from hpcalign.launch.rundir import read_run_config

    cfg = read_run_config(run_dir)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    attempt = f"{job_id}.{restart}"
    state = read_json(os.path.join(run_dir, "state.json")) or {}
    outcome: dict = {"job_id": job_id, "restart": restart, "rc": rc, "state": state.get("state"),
                     "step": state.get("step"), "failure": None, "time": time.time()}
    if os.path.exists(stopped_record_path(run_dir, os.environ)):
        # every task had ended and the watcher stopped a lingering srun: its exit status is
        # the watcher's signal, not the ranks'; state.json and the error records decide
        outcome["srun_stopped"] = True
        rc = 0
    stop_marker = os.path.join(run_dir, "stop-requested")
    exit_status = 0
    if rc == 0 and state.get("state") == "done":
        outcome["action"] = "done"
        _say(f"run finished at step {state.get('step')}: {run_dir}")
    elif rc == 0 and state.get("state") == "preempted":
        if os.path.exists(stop_marker):
            os.remove(stop_marker)
            outcome["action"] = "stopped"
            _say(f"stopped at step {state.get('step')} as requested; resume with "
                 f"`hpcalign submit` on the same config")
        elif restart < cfg.slurm.max_requeues:
            # NOTE: the outcome is recorded BEFORE the requeue: `scontrol requeue` of its own
            # job kills this batch shell at once ("CANCELLED ... DUE TO JOB REQUEUE"), so
            # nothing after it is sure to run (seen: the record of attempt 0 was missing).
            _write_outcome(run_dir, attempt, {**outcome, "action": "requeued"})
            _say(f"checkpointed at step {state.get('step')}; requeueing job {job_id} "
                 f"(restart {restart + 1} of at most {cfg.slurm.max_requeues})")
            proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True,
                                  text=True, timeout=REQUEUE_TIMEOUT_S)
            if proc.returncode:
                outcome["action"] = "requeue-failed"
                outcome["failure"] = f"scontrol requeue {job_id} failed: {proc.stderr.strip()}"
                exit_status = 1
                _say(outcome["failure"])
            else:
                outcome["action"] = "requeued"
        else:
            outcome["action"] = "stopped"
            _say(f"checkpointed at step {state.get('step')}; not requeued: "
                 f"slurm.max_requeues={cfg.slurm.max_requeues} reached. Resubmit the same "
                 f"config to resume from {run_dir}")
    else:
        srun_log = ""
        try:
            with open(os.path.join(run_dir, "logs", f"slurm-{attempt}-srun.err")) as handle:
                srun_log = handle.read()
        except OSError:
            pass
        from hpcalign.plan.placement import exclusive_models

        layout = job_layout(cfg.trainer.ranks, cfg.generator.ranks, models=tuple(
            (name, model.ranks) for name, model in exclusive_models(cfg)))
        line, record = explain_failure(run_dir, rc, srun_log, cfg.trainer.ranks, layout)
        if rc == 0:  # every rank exited 0 but no final state: a role bug, still a failure
            line = f"the job step ended without a final state (state.json: {state!r}); {line}"
        outcome["action"] = "failed"
        outcome["failure"] = line
        if record is not None:
            os.makedirs(os.path.join(run_dir, "errors"), mode=0o700, exist_ok=True)
            atomic_write_text(os.path.join(run_dir, "errors", f"job-{job_id}.json"),
                              json.dumps(record) + "\n")
        _say(f"run failed: {line}")
        exit_status = rc or 1
    _write_outcome(run_dir, attempt, outcome)
    if outcome["action"] != "requeued":  # the job is over: RUN_DIR is free again
        from hpcalign.launch.claim import Claim, read_owner, same_owner, this_owner

        holder = read_owner(run_dir)
        if holder is not None and same_owner(holder, this_owner("slurm")):
            Claim(run_dir, holder).release()
    return exit_status


def _write_outcome(run_dir: str, attempt: str, outcome: dict) -> None:
    """RUN_DIR/logs/slurm-<job>.<restart>-outcome.json, atomically (for `status`)."""
    logs = os.path.join(run_dir, "logs")
    atomic_write_text(os.path.join(logs, f"slurm-{attempt}-outcome.json"),
                      json.dumps(outcome, indent=2) + "\n")
    _remove_dead_outcome_temps(logs)


def _remove_dead_outcome_temps(logs: str) -> None:
    """Temp files of outcome writes whose batch shell was killed mid-write (any attempt)."""
    for name in os.listdir(logs) if os.path.isdir(logs) else []:
        if name.startswith(".slurm-") and "-outcome.json.tmp-" in name:
            try:
                os.unlink(os.path.join(logs, name))
            except OSError:
                pass


def claim(run_dir: str) -> int:
    """The job's claim on RUN_DIR: 0 claimed (run), 3 finished already, 1 refused."""
    from hpcalign.errors import UserError
    from hpcalign.launch.claim import take_claim
    from hpcalign.launch.local import say_finished
    from hpcalign.launch.rundir import finished_checkpoint, read_run_config

    try:
        take_claim(run_dir, "slurm", say=_say)
    except UserError as err:
        _say(f"error: {err}")
        return 1
    final = finished_checkpoint(run_dir, read_run_config(run_dir).trainer.steps)
    if final is not None:
        say_finished(run_dir, final)
        return 3
    return 0


def prepare(config: str, overrides: list[str], colocated: bool) -> str:
    """Validate against the allocation, write RUN_DIR + slurm.json; the shell lines to eval."""
    from hpcalign.config.load import load_config
    from hpcalign.launch.claim import take_claim
    from hpcalign.launch.rundir import prepare_model, write_run_dir
    from hpcalign.launch.sbatch_text import check_slurm_config
    from hpcalign.launch.slurm import write_job_record

    cfg = load_config(config, overrides)
    run_dir = os.path.abspath(cfg.run_dir)
    check_slurm_config(cfg, run_dir, sys.executable, check_tasks=False)
    env = os.environ
    t, g = cfg.trainer.ranks, cfg.generator.ranks
    from hpcalign.errors import ConfigError

    if colocated:
        if env.get("SLURM_HET_SIZE"):
            raise ConfigError("colocated.sbatch runs as one component; remove '#SBATCH hetjob'")
        ntasks = int(env.get("SLURM_NTASKS", "0") or 0)
        if ntasks != t + g:
            raise ConfigError(f"the job has {ntasks} tasks but trainer.ranks + generator.ranks "
                              f"= {t} + {g}: set #SBATCH --ntasks-per-node x --nodes = {t + g}")
    else:
        if env.get("SLURM_HET_SIZE") != "2":
            raise ConfigError("hetjob.sbatch needs two components (#SBATCH hetjob between them); "
                              f"SLURM_HET_SIZE={env.get('SLURM_HET_SIZE')}")
        for i, (role, ranks) in enumerate((("trainer", t), ("generator", g))):
            have = int(env.get(f"SLURM_NTASKS_HET_GROUP_{i}", "0") or 0)
            if have != ranks:
                raise ConfigError(f"het component {i} has {have} tasks but {role}.ranks={ranks}: "
                                  f"edit its #SBATCH --nodes / --ntasks-per-node")
    take_claim(run_dir, "slurm", say=_say)  # before anything in RUN_DIR is written
    prepare_model(cfg)
    write_run_dir(cfg)
    write_job_record(run_dir, env.get("SLURM_JOB_ID", ""),
                     "sbatch colocated" if colocated else "sbatch hetjob")
    lines = [f"HPCALIGN_RUN_DIR={shlex.quote(run_dir)}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(cfg.slurm.env.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcalign.launch.slurm_job")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write RUN_DIR from CONFIG; print shell lines to eval")
    prep.add_argument("--colocated", action="store_true")
    prep.add_argument("config")
    prep.add_argument("overrides", nargs="*")
    after = sub.add_parser("after-step", help="done / requeue / failure after the job step")
    after.add_argument("--rc", type=int, required=True)
    after.add_argument("run_dir")
    claim_parser = sub.add_parser("claim", help="claim RUN_DIR for this job (exit 3: finished)")
    claim_parser.add_argument("run_dir")
    watch = sub.add_parser("watch-step", help="stop an srun that outlives its job step")
    watch.add_argument("--pid", type=int, required=True)
    watch.add_argument("--poll-s", type=float, default=POLL_S)
    watch.add_argument("--grace-s", type=float, default=GRACE_S)
    watch.add_argument("run_dir")
    args = parser.parse_args(argv)
    from hpcalign.errors import UserError

    keep_private()
    try:
        if args.command == "prepare":
            sys.stdout.write(prepare(args.config, args.overrides, args.colocated))
            return 0
        if args.command == "claim":
            return claim(os.path.abspath(args.run_dir))
        if args.command == "watch-step":
            watch_step(args.pid, os.path.abspath(args.run_dir), poll_s=args.poll_s,
                       grace_s=args.grace_s)
            return 0
        return after_step(os.path.abspath(args.run_dir), args.rc)
    except UserError as err:
        _say(f"error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
