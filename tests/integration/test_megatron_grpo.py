"""The megatron-core trainer in a run: beside generator ranks, weight sync, GRPO, failures.

Real megatron-core on CPU/gloo under real mpiexec, no mocks:
- the resharding weight sync: a TP=2 (and a TP=2 x PP=2) megatron trainer sends its
  shards layer by layer to a torch generator, whose weights must then equal, bit for bit,
  what `hpcalign convert megatron-to-hf` exports from the trainer's dist checkpoint;
- `configs/grpo-megatron-tiny.yaml` (TP=2 trainer + torch generator, 3 MPI ranks) through
  `hpcalign run`: a trainer rank SIGKILLed mid-run ends the job naming it; the same
  command resumes from the last checkpoint and finishes (the reward's rise over 200 steps
  is a figure of docs/megatron.md, not a test: minutes of CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from local_runs import ROOT, TINY, hpcalign_argv, kill_job, metrics, role_pids
from safetensors.torch import load_file
from standins import llama_standin, qwen_standin
from test_megatron_engine import mpiexec  # one mpiexec-a-script helper

pytest.importorskip("megatron.core")

SCRIPTS = os.path.join(os.path.dirname(__file__), "mpi_scripts")
CONFIG = os.path.join(ROOT, "configs", "grpo-megatron-tiny.yaml")


@pytest.mark.parametrize("layout", ["tp2", "tp2xpp2"])
def test_synced_generator_equals_the_megatron_to_hf_export(tmp_path, layout):
    """After one GRPO step and two syncs in small buckets (tensors of one layer split over
    several), the generator's every weight is torch.equal to the export of the trainer's
    dist checkpoint, and so is the trainer's streamed `save_model`. TP=2: a tied Qwen2
    with q/k/v biases (3 ranks); TP=2 x PP=2: an untied Llama, whose head comes from the
    last stage (5 ranks)."""
    if layout == "tp2":
        model, trainers, tp, pp = qwen_standin(tmp_path / "model"), 2, 2, 1
    else:
        model, trainers, tp, pp = llama_standin(tmp_path / "model"), 4, 2, 2
    out = tmp_path / "out"
    out.mkdir()
    mpiexec(trainers + 1, "megatron_sync.py", model, str(out), str(trainers), str(tp), str(pp))
    result = subprocess.run(hpcalign_argv("convert", "megatron-to-hf", str(out / "megatron"),
                                          str(tmp_path / "export")),
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    export = load_file(str(tmp_path / "export" / "model.safetensors"))
    generator = load_file(str(out / f"generator-{trainers}.safetensors"))
    saved = load_file(str(out / "saved" / "model.safetensors"))
    original = load_file(os.path.join(model, "model.safetensors"))
    assert sorted(generator) == sorted(export) == sorted(saved) == sorted(original)
    assert ("lm_head.weight" in export) == (layout == "tp2xpp2")
    for name, tensor in export.items():
        assert torch.equal(generator[name], tensor), name
        assert torch.equal(saved[name], tensor), name
    # the step moved every tensor: the generator got the trained weights, not the files'
    changed = [name for name in export if not torch.equal(export[name], original[name])]
    assert len(changed) == len(export), sorted(set(export) - set(changed))


# ---------------------------------------------------------------- a run
def _wait_for_step(run_dir, step: int, proc: subprocess.Popen, err_path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(row["step"] >= step for row in metrics(run_dir)):
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {err_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no step {step} within {timeout} s")
        time.sleep(0.1)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def _world_rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    value = env.get(b"OMPI_COMM_WORLD_RANK") or env.get(b"PMIX_RANK")
    return int(value) if value is not None else None


def test_killed_megatron_rank_ends_the_job_naming_it_and_the_run_resumes(tmp_path):
    """configs/grpo-megatron-tiny.yaml (TP=2 megatron trainer + torch generator, 3 ranks)
    at the tests' small shape: trainer rank 1 SIGKILLed after a dist checkpoint ends the
    whole job within seconds, naming the rank; the same command resumes and finishes."""
    run_dir = tmp_path / "run"
    argv = hpcalign_argv("run", CONFIG, f"run_dir={run_dir}", *TINY)
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                                start_new_session=True)
    try:
        _wait_for_step(run_dir, 4, proc, err_path, timeout=400)  # past the step-3 checkpoint
        ranks = [pid for pid in role_pids(run_dir, "trainer") if _world_rank(pid) == 1]
        # the rank, not its forked helpers (megatron's checkpoint Manager has its argv)
        (victim,) = [pid for pid in ranks if _parent(pid) not in ranks]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert time.monotonic() - killed < 60, "the job outlived its dead megatron rank"
    assert proc.returncode != 0
    assert "trainer 1 (world rank 1)" in err_path.read_text(), err_path.read_text()[-2000:]
    assert not role_pids(run_dir, "trainer") and not role_pids(run_dir, "generator")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "done" and state["step"] == 10, state
