"""Helpers to start real local runs (`hpcalign run`, real mpiexec) and watch them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")

# A small, fast variant of the quickstart: seconds per run on 2 cores.
TINY = [
    "model.init.hidden=64", "model.init.intermediate=128", "model.init.heads=4",
    "model.init.kv_heads=2", "generator.prompts_per_step=4", "generator.samples_per_prompt=4",
    "trainer.sft_warmup_steps=5", "trainer.sft_batch=16", "trainer.steps=10",
    "checkpoint.every_steps=3", "log.progress=false", "log.eval_every_steps=0",
    "log.tensorboard=false", "comm.timeout_s=60",
]


def hpcalign_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpcalign.cli", *args]


def start_run(run_dir, *overrides: str, faults: str | None = None) -> subprocess.Popen:
    """`hpcalign run` of the TINY quickstart in the background; `faults`: HPCALIGN_FAULTS."""
    argv = hpcalign_argv("run", QUICKSTART, f"run_dir={run_dir}", *TINY, *overrides)
    env = dict(os.environ, HPCALIGN_FAULTS=faults) if faults else None
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=ROOT, env=env)


def run_to_end(run_dir, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = hpcalign_argv("run", QUICKSTART, f"run_dir={run_dir}", *TINY, *overrides)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path).read().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return rows


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 240,
                  newer_than: int | None = None) -> None:
    """Wait until metrics.jsonl shows `step` (written after `newer_than` was rewritten, for a
    resumed run whose file still holds the killed run's lines)."""
    deadline = time.monotonic() + timeout
    started = time.time()
    path = os.path.join(run_dir, "metrics.jsonl")
    while time.monotonic() < deadline:
        fresh = newer_than is None or (os.path.exists(path) and os.path.getmtime(path) > started)
        if fresh and any(row["step"] >= step for row in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (mpiexec runs in its own session, so not in pid's group)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process it started, at once (a crashed node)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def role_pids(run_dir, role: str) -> list[int]:
    """PIDs of the rank processes (not mpiexec, whose MPMD argv names every role)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if ("hpcalign.roles.main" in argv and ":" not in argv and argv[-1] == str(run_dir)
                and role in argv):
            pids.append(int(entry))
    return pids


def checkpoint_tensors(run_dir, step: int) -> dict[str, torch.Tensor]:
    base = os.path.join(run_dir, "checkpoints", f"step-{step:06d}")
    tensors = {f"model/{k}": v for k, v in load_file(os.path.join(base, "model", "model.safetensors")).items()}
    tensors.update({f"optim/{k}": v for k, v in load_file(os.path.join(base, "optimizer.safetensors")).items()})
    return tensors


def shard_checksums(run_dir) -> dict[str, str]:
    """{step-dir/shard: checksum} of every published shard (the rollouts a run used)."""
    import h5py

    found = {}
    root = os.path.join(run_dir, "rollouts")
    for step_dir in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, step_dir))):
            if name.endswith(".h5"):
                with h5py.File(os.path.join(root, step_dir, name), "r", locking=False) as f:
                    found[f"{step_dir}/{name}"] = str(f.attrs["checksum"])
            else:
                found[f"{step_dir}/{name}"] = "NOT A SHARD"
    return found


def assert_same_training(got, expected, steps: int) -> None:
    """Two runs trained the same: final checkpoint bitwise (model and optimizer), every
    step's shard the same, metrics.jsonl holding steps 0..steps-1 once with equal rewards."""
    want, have = checkpoint_tensors(expected, steps), checkpoint_tensors(got, steps)
    assert want.keys() == have.keys()
    unequal = [k for k in want if not torch.equal(want[k], have[k])]
    assert not unequal, f"tensors differ: {unequal[:5]}"
    assert shard_checksums(got) == shard_checksums(expected)
    rows = metrics(got)
    assert [r["step"] for r in rows] == list(range(steps)), [r["step"] for r in rows]
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in metrics(expected)]
