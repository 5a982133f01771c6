"""Fault injection at named points, for the tests of "killed at any moment, resumes exactly".

A crash at a chosen instant (between a checkpoint's files and its rename, after the final
checkpoint but before `state.json` says done, ...) cannot be hit reliably from outside by
timing a `kill`. So the code calls `maybe_fire("point", step=...)` at those instants, and
the environment variable `HPCALIGN_FAULTS` arms some of them:

    HPCALIGN_FAULTS="checkpoint-write@6"          SIGKILL this rank inside checkpoint 6
    HPCALIGN_FAULTS="before-done:pause"           stop there (a marker file, then sleep)
    HPCALIGN_FAULTS="write:state.json@2,startup"  several points

Points: `sft-saved` (trainer leader, SFT warm-up model on disk, before it tells the other
trainers), `startup` (trainer, models loaded, before the first sync), `step` (trainer, inside
an update, after backward), `checkpoint-write` (files written, before the rename),
`after-checkpoint` (checkpoint renamed, before the next step), `before-done` (final
checkpoint and metrics written, before `state.json` says done), `write:<file name>` (an
atomic write, temp file complete, before its rename), `rollout-shard` (`hpcalign rollout`,
shard N of a part written, before the next). `@N` restricts a point to step N
(for `write:` points: the N-th such write, counted from 1).

Actions: `kill` (default: SIGKILL of this process, as a node failure does) or `pause`
(write `RUN_DIR/faults/<point>.paused`, then wait `PAUSE_S` or until the test removes that
file: the test acts from outside meanwhile, e.g. `scontrol requeue`, then lets it go on).
A point fires once per RUN_DIR: `RUN_DIR/faults/<spec>.fired` is written first, so a
resumed run with the same environment (a requeued Slurm job) runs on.
Without `HPCALIGN_FAULTS` every call is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "HPCALIGN_FAULTS"
PAUSE_S = 300.0  # bounded: a test that forgets to act sees the run go on, not hang forever

_run_dir: str | None = None
_counts: dict[str, int] = {}


def configure(run_dir: str) -> None:
    """Where fired/paused markers go (the rank entry calls this once)."""
    global _run_dir
    _run_dir = run_dir


def _parse(item: str) -> tuple[str, int | None, str]:
    """'write:state.json@2:pause' -> ('write:state.json', 2, 'pause')."""
    prefix = ""
    if item.startswith("write:"):
        prefix, item = "write:", item[len("write:"):]
    spec, _, action = item.partition(":")
    point, _, step = spec.partition("@")
    return prefix + point, int(step) if step else None, action or "kill"


def _armed(point: str, step: int | None) -> str | None:
    """The action armed for `point` at `step`, or None."""
    items = (part.strip() for part in os.environ.get(ENV, "").split(","))
    for name, at, action in map(_parse, filter(None, items)):
        if name == point and (at is None or at == step):
            return action
    return None


def maybe_fire(point: str, step: int | None = None, path: str | None = None) -> None:
    """Fire `point` if `HPCALIGN_FAULTS` arms it (for this step) and it has not fired yet."""
    if not os.environ.get(ENV) or _run_dir is None:
        return
    if path is not None:  # an atomic write: the point is named after the file
        point = f"write:{os.path.basename(path)}"
        _counts[point] = _counts.get(point, 0) + 1
        step = _counts[point]
    action = _armed(point, step)
    if action is None:
        return
    marker_dir = os.path.join(_run_dir, "faults")
    os.makedirs(marker_dir, mode=0o700, exist_ok=True)
    name = point.replace("/", "_").replace(":", "_") + ("" if step is None else f"@{step}")
    fired = os.path.join(marker_dir, f"{name}.fired")
    try:
        os.close(os.open(fired, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return  # fired in an earlier attempt
    if action == "pause":
        paused = os.path.join(marker_dir, f"{name}.paused")
        with open(paused, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + PAUSE_S
        while os.path.exists(paused) and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    os.kill(os.getpid(), signal.SIGKILL)
