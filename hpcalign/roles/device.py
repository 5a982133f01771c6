"""Which device a rank computes on, and which torch.distributed backend the world uses.

`trainer.device` / `generator.device`: "auto" (a GPU when this rank sees one, else the
CPU), "cpu", or "cuda" (a GPU or a clear error). A rank on a GPU takes the GPU of its
node-local rank (Slurm's SLURM_LOCALID, Open MPI's OMPI_COMM_WORLD_LOCAL_RANK, or
LOCAL_RANK) modulo the GPUs it sees, so 8 ranks on an 8-GPU node get one GPU each.

The backend (`comm.dist_backend: auto`) is decided once, by world rank 0, and sent to every
rank with the rendezvous address (comm/weights.py): NCCL when rank 0 computes on a GPU and
neither role is pinned to the CPU, gloo otherwise. A rank that is told "nccl" but has no
GPU fails at start-up naming itself (`comm.weights.check_backend`), instead of every rank
choosing on its own and the world hanging on a mismatch.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

DeviceChoice = Literal["auto", "cpu", "cuda"]
_LOCAL_RANK_VARIABLES = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK")


def local_rank(env: dict[str, str] | None = None) -> int:
    """This process's rank among the ranks of its node (0 when nothing says)."""
    env = dict(os.environ if env is None else env)
    for name in _LOCAL_RANK_VARIABLES:
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def role_device(choice: DeviceChoice, field: str, env: dict[str, str] | None = None,
                cuda_count: int | None = None) -> torch.device:
    """The device of this rank for `choice` (the config value of `field`)."""
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if choice == "cpu" or (choice == "auto" and count == 0):
        return torch.device("cpu")
    if count == 0:
        raise RuntimeError(f"{field}=cuda but this rank sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); ask Slurm "
                           f"for GPUs (slurm.<component>.gpus_per_node) or set {field}=cpu")
    return torch.device("cuda", local_rank(env) % count)


def choose_backend(configured: str, rank0_device: torch.device, trainer_choice: DeviceChoice,
                   generator_choice: DeviceChoice) -> str:
    """The torch.distributed backend rank 0 announces ("auto" resolved)."""
    if configured != "auto":
        return configured
    on_gpus = rank0_device.type == "cuda" and "cpu" not in (trainer_choice, generator_choice)
    return "nccl" if on_gpus else "gloo"
