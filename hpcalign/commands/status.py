"""`hpcalign status RUN_DIR`: where a run is — state, step, last metrics, throughput, ETA.

Works from any login shell: everything comes from RUN_DIR (state.json, metrics.jsonl,
checkpoints/, errors/) plus, for Slurm runs, the job's state from Slurm.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from hpcalign.errors import UserError
from hpcalign.launch.claim import owner_status
from hpcalign.launch.rundir import finished_checkpoint, list_checkpoints, read_json

HELP = "show where a run is: state, step, reward, throughput, ETA, errors"


def _last_metrics(run_dir: str) -> dict | None:
    from hpcalign.metrics import read_metrics

    rows = read_metrics(run_dir)
    return rows[-1] if rows else None


def _configured_steps(run_dir: str) -> int | None:
    """trainer.steps of the config the run was started with (None if unreadable)."""
    try:
        from hpcalign.launch.rundir import read_run_config

        return read_run_config(run_dir).trainer.steps
    except (UserError, OSError):
        return None


def collect_status(run_dir: str) -> dict:
    """Everything `status` prints, as a dict (also for `--json`)."""
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)")
    state = read_json(os.path.join(run_dir, "state.json")) or {"state": "not started"}
    status: dict = {"run_dir": os.path.abspath(run_dir), **state}
    status["checkpoints"] = list_checkpoints(run_dir)
    steps = state.get("steps") or _configured_steps(run_dir)
    final = finished_checkpoint(run_dir, steps) if steps else None
    if final is not None:
        # the final checkpoint decides, also for a job killed before state.json said so
        status.update(state="done", step=max(status["checkpoints"]), steps=steps,
                      final_checkpoint=final)
    status["owner"] = owner_status(run_dir)
    last = _last_metrics(run_dir)
    if last:
        status["last_metrics"] = last
        if status.get("state") == "running":  # state.json is written at start and end only
            status["step"] = last["step"] + 1
            status["policy_version"] = int(last.get("policy_version", last["step"] + 1))
        steps = state.get("steps")
        if steps and last.get("time_step_s"):
            remaining = max(0, steps - last["step"] - 1)
            status["eta_s"] = remaining * last["time_step_s"]
    errors_dir = os.path.join(run_dir, "errors")
    errors = [read_json(os.path.join(errors_dir, n)) for n in sorted(os.listdir(errors_dir))
              ] if os.path.isdir(errors_dir) else []
    # the launcher's verdict names the root cause; ranks' own records follow
    status["errors"] = sorted((e for e in errors if e), key=lambda e: not e.get("root_cause"))
    if status["errors"] and status.get("state") == "running":
        status["state"] = "failed"
    owner = status["owner"]
    if status.get("state") == "running" and not (owner and owner["alive"]):
        status["state"] = "interrupted"  # killed without a word: run it again to resume
    if os.path.isfile(os.path.join(run_dir, "slurm.json")):
        from hpcalign.launch.slurm import slurm_status

        status["slurm"] = slurm_status(run_dir)
    if status.get("state") == "running" and "time" in state:
        status["last_update_s_ago"] = time.time() - state["time"]
    return status


def format_status(status: dict) -> str:
    lines = [f"run:        {status['run_dir']}",
             f"state:      {status.get('state')}  (step {status.get('step', 0)}"
             f" of {status.get('steps', '?')}, policy version {status.get('policy_version', 0)})"]
    slurm = status.get("slurm")
    if slurm:
        lines.append(f"slurm:      job {slurm.get('job_id')} {slurm.get('state')}  " + "  ".join(
            f"{name}: {info}" for name, info in (slurm.get("components") or {}).items()))
        if slurm.get("restarts"):
            lines.append(f"requeued:   {slurm['restarts']} time(s)")
        if slurm.get("failure"):
            lines.append(f"failure:    {slurm['failure']}")
        if slurm.get("slurm_error"):
            lines.append(f"slurm said: {slurm['slurm_error']}")
    last = status.get("last_metrics")
    if last:
        lines.append(f"last step:  {last['step']}  reward {last.get('reward_mean', float('nan')):.3f}"
                     f"  kl {last.get('kl', float('nan')):.4f}"
                     f"  {last.get('samples_per_s', 0):.1f} samples/s"
                     f"  {last.get('time_step_s', 0):.2f} s/step")
    if "eta_s" in status and status.get("state") == "running":
        lines.append(f"eta:        {status['eta_s'] / 60:.1f} min")
    lines.append(f"checkpoints: {', '.join(map(str, status['checkpoints'])) or 'none'}")
    if status.get("final_checkpoint"):
        lines.append(f"final:      {status['final_checkpoint']}")
    owner = status.get("owner")
    if owner:
        lines.append(f"owner:      {owner['holder']}: "
                     f"{'alive' if owner['alive'] else 'gone (stale claim)'} ({owner['why']})")
    else:
        lines.append("owner:      none (no run holds this directory)")
    for err in status.get("errors", []):
        lines.append(f"error:      {err.get('role')} on {err.get('host')}: {err.get('error')}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign status", description=HELP)
    parser.add_argument("run_dir")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)
    status = collect_status(args.run_dir)
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    failed = status.get("errors") or (status.get("slurm") or {}).get("failure")
    return 1 if failed else 0
