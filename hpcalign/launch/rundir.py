"""RUN_DIR: the source of truth of a run on the shared filesystem (private: mode 0700)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from hpcalign.config.load import dump_config, load_config
from hpcalign.config.schema import Config
from hpcalign.durable import atomic_write_text
from hpcalign.errors import UserError
from hpcalign.plan.placement import compute_placement, model_map

__all__ = ["atomic_write_text", "checkpoint_dir", "finished_checkpoint", "list_checkpoints",
           "make_private_dir", "mark_finished", "prepare_model", "read_json", "read_run_config",
           "write_run_dir"]

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: str, step: int) -> str:
    """RUN_DIR/checkpoints/step-NNNNNN (NNNNNN = the next step to train)."""
    return os.path.join(run_dir, "checkpoints", f"step-{step:06d}")


def list_checkpoints(run_dir: str) -> list[int]:
    """Steps of complete checkpoints, oldest first (temp dirs never match)."""
    root = os.path.join(run_dir, "checkpoints")
    steps = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, "state.json")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def finished_checkpoint(run_dir: str, steps: int) -> str | None:
    """The final checkpoint if the run already trained all `steps`, else None.

    The checkpoint, not state.json, decides: a job killed after its final checkpoint and
    before state.json said "done" has finished all the same.
    """
    done = [step for step in list_checkpoints(run_dir) if step >= steps]
    return checkpoint_dir(run_dir, done[-1]) if done else None


def mark_finished(run_dir: str, checkpoint: str) -> dict:
    """Make state.json say "done" at `checkpoint` (if it does not already); returns it."""
    state = read_json(os.path.join(run_dir, "state.json")) or {}
    if state.get("state") == "done":
        return state
    saved = read_json(os.path.join(checkpoint, "state.json")) or {}
    state = {**state, "state": "done", "step": int(saved.get("step", 0)),
             "policy_version": int(saved.get("policy_version", saved.get("step", 0))),
             "time": time.time()}
    state.setdefault("steps", state["step"])
    atomic_write_text(os.path.join(run_dir, "state.json"), json.dumps(state) + "\n")
    return state


def make_private_dir(path: str) -> None:
    """Create `path` (and parents) with mode 0700; tighten it if it already exists."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def write_run_dir(cfg: Config) -> str:
    """Create RUN_DIR (0700) with the resolved config.yaml and plan.json; returns its path.

    Re-running on an existing RUN_DIR resumes, so existing contents are left alone and
    only config.yaml and plan.json are replaced by what runs now.
    """
    run_dir = os.path.abspath(cfg.run_dir)
    make_private_dir(run_dir)
    for sub in ("rollouts", "checkpoints", "logs", "errors"):
        make_private_dir(os.path.join(run_dir, sub))
    atomic_write_text(os.path.join(run_dir, "config.yaml"), dump_config(cfg))
    placement = compute_placement(cfg)
    plan = {**placement.to_dict(), "model_map": model_map(cfg, placement)}
    atomic_write_text(os.path.join(run_dir, "plan.json"), json.dumps(plan, indent=2) + "\n")
    return run_dir


def prepare_model(cfg: Config) -> None:
    """Make sure model.path holds a model (building `model.init`'s tiny one if asked).

    NOTE: the build runs in a child process (`python -m hpcalign.models.prepare`): the
    launcher stays free of torch and transformers, whose import alone costs seconds on a
    login node. A model that is already there costs no child at all.
    """
    if os.path.isfile(os.path.join(cfg.model.path, "config.json")):
        return
    if cfg.model.init is None:
        raise UserError(f"model.path='{cfg.model.path}' holds no HF model (config.json) and "
                        f"model.init is not set; run `hpcalign init-model {cfg.model.path}` or "
                        f"set model.init")
    proc = subprocess.run([sys.executable, "-m", "hpcalign.models.prepare", cfg.model.path,
                           cfg.model.init.model_dump_json()], capture_output=True, text=True)
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("hpcalign: error: ") if lines else "no output"
        raise UserError(f"building model.init into {cfg.model.path} failed: {reason}")


def read_run_config(run_dir: str) -> Config:
    """The config a run was started with (validated again: RUN_DIR may be edited by hand)."""
    return load_config(os.path.join(run_dir, "config.yaml"))


def read_json(path: str) -> dict | None:
    """A small JSON state file, or None if absent or torn."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
