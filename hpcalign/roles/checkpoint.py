"""Checkpoints: model, optimizer, RNG, data position and policy version — complete or absent.

Layout of `RUN_DIR/checkpoints/step-000050/` (50 = the next step to train):
  model/                 HF format (config.json, model.safetensors, tokenizer), so any
                         checkpoint feeds `hpcalign rollout`, vLLM or a converter as is;
                         the tokenizer and config files are the input model's, byte for byte
  optimizer.safetensors  every tensor of the optimizer state, by flattened key
  optimizer.json         the rest of the optimizer state (param groups, scalars)
  rng.safetensors        torch's CPU RNG state
  state.json             step, policy_version, next generation step, seed, format
No pickles: `torch.load` never runs on a checkpoint. A checkpoint is written to a temp
directory and renamed, so a killed job leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hpcalign import faults
from hpcalign.durable import fsync_dir, fsync_tree
from hpcalign.errors import storage_errno
from hpcalign.launch.rundir import checkpoint_dir, list_checkpoints

__all__ = ["checkpoint_dir", "list_checkpoints", "load_checkpoint", "load_optimizer",
           "save_checkpoint", "save_optimizer"]

CHECKPOINT_FORMAT_VERSION = 1


def _split_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split_state(k, f"{prefix}.k{i}", tensors),
                              _split_state(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        kind = "__list__" if isinstance(obj, list) else "__tuple__"
        return {kind: [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} without pickling")


def _join_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_join_state(k, tensors): _join_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_join_state(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_join_state(v, tensors) for v in obj["__tuple__"])
    return obj


def save_state_dict(state: dict[str, Any], tensors_path: str, json_path: str) -> None:
    """A nested state dict as safetensors (tensors) + JSON (structure and scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_state(state, "s", tensors)
    save_file(tensors, tensors_path)
    with open(json_path, "w") as handle:
        json.dump(structure, handle)


def load_state_dict(tensors_path: str, json_path: str) -> dict[str, Any]:
    with open(json_path) as handle:
        structure = json.load(handle)
    return _join_state(structure, load_file(tensors_path))


def save_checkpoint(run_dir: str, step: int, save_model: Callable[[str], None],
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int,
                    extra: Callable[[str], None] | None = None) -> str:
    """Write checkpoint `step` atomically and prune all but the newest `keep`.

    `save_model(dir)` writes the model as an HF directory (the training engine's
    `save_model`, which keeps the input's tokenizer and config files). `extra(dir)` writes
    the other trainable models of the flow into the same checkpoint directory before it is
    renamed (PPO's critic under `models/value/`), so one rename makes all of them durable.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp, mode=0o700)
        save_model(os.path.join(tmp, "model"))
        save_state_dict(optimizer.state_dict(), os.path.join(tmp, "optimizer.safetensors"),
                        os.path.join(tmp, "optimizer.json"))
        save_file({"torch_cpu": torch.get_rng_state()}, os.path.join(tmp, "rng.safetensors"))
        if extra is not None:
            extra(tmp)
        with open(os.path.join(tmp, "state.json"), "w") as handle:
            json.dump({"format_version": CHECKPOINT_FORMAT_VERSION, **state}, handle, indent=2)
        fsync_tree(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)  # never left half-written (and frees the space)
        found = storage_errno(err)  # safetensors names neither the file nor an OSError
        if found is not None:
            raise OSError(found[0], os.strerror(found[0]), found[1] or tmp) from err
        raise
    faults.maybe_fire("checkpoint-write", step=step)
    if os.path.exists(final):  # a re-run of the same step after a crash: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))
    _prune(run_dir, keep)
    return final


def _prune(run_dir: str, keep: int) -> None:
    """All but the newest `keep` checkpoints go, except those whose state says
    `"keep": true` (`checkpoint.keep_every_steps`: the versions a replay needs)."""
    root = os.path.join(run_dir, "checkpoints")
    for step in list_checkpoints(run_dir)[:-keep]:
        if _kept_forever(checkpoint_dir(run_dir, step)):
            continue
        shutil.rmtree(checkpoint_dir(run_dir, step), ignore_errors=True)
    for name in os.listdir(root):
        if ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _kept_forever(path: str) -> bool:
    try:
        with open(os.path.join(path, "state.json")) as handle:
            return json.load(handle).get("keep") is True
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: the ordinary rule


def load_checkpoint(run_dir: str, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place; returns the checkpoint's state.json."""
    path = checkpoint_dir(run_dir, step)
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(glob.escape(path), "model", "*.safetensors"))):
        weights.update(load_file(file))  # one file, or the shards of a large model
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or any(key not in tied and "lm_head" not in key for key in missing):
        raise RuntimeError(f"{path}: checkpoint does not match the model "
                           f"(missing {missing}, unexpected {unexpected})")
    optimizer.load_state_dict(load_state_dict(os.path.join(path, "optimizer.safetensors"),
                                              os.path.join(path, "optimizer.json")))
    torch.set_rng_state(load_file(os.path.join(path, "rng.safetensors"))["torch_cpu"])
    with open(os.path.join(path, "state.json")) as handle:
        return json.load(handle)


def save_optimizer(optimizer: torch.optim.Optimizer, directory: str) -> None:
    """An optimizer's state as `optimizer.safetensors` + `optimizer.json` in `directory`."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    save_state_dict(optimizer.state_dict(), os.path.join(directory, "optimizer.safetensors"),
                    os.path.join(directory, "optimizer.json"))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: str) -> None:
    optimizer.load_state_dict(load_state_dict(os.path.join(directory, "optimizer.safetensors"),
                                              os.path.join(directory, "optimizer.json")))
