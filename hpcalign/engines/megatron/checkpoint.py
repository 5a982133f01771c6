"""megatron distributed checkpoints (`dist_checkpointing`): conversion output and training.

A megatron checkpoint directory written by hpcalign holds:
  metadata.json, *.distcp, common.pt   megatron's own files (layout-free: any TP x PP
                                       loads it, resharding on load)
  hpcalign_megatron.json               the model shape, padded vocabulary, the layout it
                                       was written for, format version
  hf/                                  the HF source's non-weight files (tokenizer,
                                       config.json, generation_config.json) byte for byte

A training checkpoint `RUN_DIR/checkpoints/step-N/` holds `model/` (HF format, as the torch
engine's, so `hpcalign rollout` and vLLM read it), `megatron/` (model + optimizer as a
dist checkpoint: resume at another TP/PP reshards) and `state.json`.

Every function here is collective over megatron's world (the trainer ranks of a run) and
runs inside `parallel.megatron_world()`: dist_checkpointing's barriers and object
collectives take the default group.

NOTE: `dist_checkpointing.load` runs `torch.load` on `common.pt` (megatron's format):
load only checkpoints you wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from hpcalign.durable import atomic_write_text, fsync_dir, fsync_tree
from hpcalign.engines.megatron.parallel import megatron_world
from hpcalign.errors import UserError
from hpcalign.launch.rundir import checkpoint_dir, list_checkpoints
from hpcalign.models.hf import copy_model_files

META = "hpcalign_megatron.json"
FORMAT_VERSION = 1


def is_megatron_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def read_meta(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, META)) as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not an hpcalign megatron checkpoint ({err})") from err
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}/{META}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    return meta


@megatron_world()
def save_dist_checkpoint(model: Any, out_dir: str, meta: dict[str, Any],
                         source_dir: str | None) -> None:
    """The model as a megatron dist checkpoint in `out_dir` (collective: every rank)."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(out_dir, mode=0o700, exist_ok=True)
        if os.listdir(out_dir):
            raise UserError(f"{out_dir}: exists and is not empty")
    dist.barrier()
    _results_queue_without_spawn()
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    if rank == 0:
        if source_dir is not None:
            os.makedirs(os.path.join(out_dir, "hf"), exist_ok=True)
            copy_model_files(source_dir, os.path.join(out_dir, "hf"))
        with open(os.path.join(out_dir, META), "w") as handle:
            json.dump({**meta, "format": FORMAT_VERSION}, handle, indent=2)
    dist.barrier()


@megatron_world()
def load_dist_checkpoint(model: Any, path: str) -> None:
    """Load a dist checkpoint into `model` (this rank's shard of any layout)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(state, strict=False)


def _results_queue_without_spawn() -> None:
    """megatron's checkpoint writer collects results through a `spawn` Manager queue; a
    spawned child re-imports the rank's main module, and one that imports mpi4py calls
    MPI_Init again under mpiexec and hangs (seen: a TP=2 save still waiting after 10 min).
    A forked Manager starts the same server without re-importing anything."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=_detach_from_rank)
        filesystem_async._results_queue = manager.Queue()


def _detach_from_rank() -> None:
    """In the Manager's server process: die with the rank, and let go of its stdio.

    NOTE: the forked server inherits the rank's stdout/stderr, the pipes mpiexec (or srun)
    reads; mpiexec counts a rank as ended only once those close, so a SIGKILLed rank whose
    server lived on kept the whole job waiting (seen: not ended after 120 s).
    """
    import signal

    from hpcalign.launch.local import die_with_parent

    die_with_parent(signal.SIGKILL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


@megatron_world()
def save_training_checkpoint(engine: Any, run_dir: str, step: int, state: dict[str, Any],
                             keep: int) -> str:
    """`RUN_DIR/checkpoints/step-N/`: HF model, megatron model + optimizer, state.json.

    Written under a temp name and renamed by rank 0 (whole or absent), older ones pruned.
    """
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(run_dir, step)
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "megatron"), mode=0o700)
    dist.barrier()
    engine.save_model(os.path.join(tmp, "model"))
    model_state = engine.model.sharded_state_dict()
    sharded = {"model": model_state,
               "optimizer": engine.optimizer.sharded_state_dict(model_state)}
    _results_queue_without_spawn()
    dist_checkpointing.save(sharded, os.path.join(tmp, "megatron"))
    if rank == 0:
        atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(
            {**state, "rng": torch.get_rng_state().tolist(), "engine": "megatron"}))
        fsync_tree(tmp)  # every rank's shards and the HF export, before the rename
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(os.path.dirname(final))
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(checkpoint_dir(run_dir, old), ignore_errors=True)
    dist.barrier()
    return final


@megatron_world()
def load_training_checkpoint(engine: Any, run_dir: str, step: int) -> dict[str, Any]:
    """Restore model + optimizer of checkpoint `step` (any saving layout); its state."""
    from megatron.core import dist_checkpointing

    path = checkpoint_dir(run_dir, step)
    model_state = engine.model.sharded_state_dict()
    sharded = {"model": model_state,
               "optimizer": engine.optimizer.sharded_state_dict(model_state, is_loading=True)}
    loaded = dist_checkpointing.load(sharded, os.path.join(path, "megatron"))
    engine.model.load_state_dict(loaded["model"], strict=False)
    engine.optimizer.load_state_dict(loaded["optimizer"])
    with open(os.path.join(path, "state.json")) as handle:
        state = json.load(handle)
    torch.set_rng_state(torch.tensor(state.pop("rng"), dtype=torch.uint8))
    state.pop("engine", None)
    return state
