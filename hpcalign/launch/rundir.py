"""RUN_DIR: the source of truth of a run on the shared filesystem (private: mode 0700)."""

from __future__ import annotations

import json
import os

from hpcalign.config.load import dump_config, load_config
from hpcalign.config.schema import Config
from hpcalign.plan.placement import compute_placement


def atomic_write_text(path: str, text: str) -> None:
    """Write via a temp name + fsync + rename, so readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
    plan = compute_placement(cfg).to_dict()
    atomic_write_text(os.path.join(run_dir, "plan.json"), json.dumps(plan, indent=2) + "\n")
    return run_dir


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
