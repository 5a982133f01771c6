"""Data plane: torch.distributed setup and the trainer → generator weight broadcast.

The world's torch.distributed group mirrors the MPI world (same ranks); its address comes
from trainer 0 over MPI (no directory polling on a shared filesystem) and is also
written to RUN_DIR/rendezvous.json for people. gloo on CPU, NCCL on GPUs: same code.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hpcalign.comm.control import TAG_RENDEZVOUS, Control


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _own_address() -> str:
    override = os.environ.get("HPCALIGN_MASTER_ADDR")
    if override:
        return override
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def check_backend(backend: str, device: torch.device, who: str) -> None:
    """NCCL moves GPU tensors only: a rank without a GPU cannot join an NCCL world."""
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError(f"{who} computes on {device} but the world uses NCCL (chosen by "
                           f"rank 0 or comm.dist_backend): give this role GPUs, or set "
                           f"comm.dist_backend=gloo")


def init_distributed(control: Control, run_dir: str, backend: str, timeout_s: float,
                     device: torch.device | None = None, who: str = "this rank") -> str:
    """Start torch.distributed over the MPI world; rank 0 chooses address and backend.

    The address travels as a bounded control message, not a blocking MPI bcast, so a
    silent rank 0 ends in a named timeout rather than a hang. `backend` counts at rank 0
    only ("auto" means gloo there, for callers without a device policy); every other rank
    takes rank 0's, and checks that its `device` can use it. Returns the backend.
    """
    comm = control.comm
    device = torch.device("cpu") if device is None else device
    if comm.Get_rank() == 0:
        if backend == "auto":
            backend = "gloo"
        address = {"host": _own_address(), "port": _free_port(), "backend": backend}
        path = os.path.join(run_dir, "rendezvous.json")
        with open(path + ".tmp", "w") as handle:
            json.dump(address, handle)
        os.replace(path + ".tmp", path)
        for rank in range(1, comm.Get_size()):
            control.send(address, dest=rank, tag=TAG_RENDEZVOUS)
    else:
        address = control.recv(0, TAG_RENDEZVOUS, "the torch.distributed address", timeout_s)
        backend = str(address["backend"])
    check_backend(backend, device, who)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{address['host']}:{address['port']}",
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return backend


class WeightBroadcaster:
    """Broadcast a model's parameters from one rank in coalesced buckets.

    Both sides build the same buckets from the same parameter order (same architecture),
    so each bucket is one `broadcast` of one flat buffer: few large messages instead of
    one per tensor. Receivers copy into their parameters in place.
    """

    def __init__(self, params: list[torch.Tensor], bucket_mb: float, src: int,
                 group: dist.ProcessGroup | None) -> None:
        self.params = params
        self.src = src
        self.group = group
        limit = int(bucket_mb * 1024 * 1024)
        self.buckets: list[list[int]] = []
        current: list[int] = []
        size = 0
        for index, param in enumerate(params):
            nbytes = param.numel() * param.element_size()
            same_dtype = not current or params[current[0]].dtype == param.dtype
            if current and (size + nbytes > limit or not same_dtype):
                self.buckets.append(current)
                current, size = [], 0
            current.append(index)
            size += nbytes
        if current:
            self.buckets.append(current)

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    @torch.no_grad()
    def broadcast(self) -> None:
        rank = dist.get_rank()
        for bucket in self.buckets:
            tensors = [self.params[i].data for i in bucket]
            if rank == self.src:
                flat = _flatten_dense_tensors(tensors)
                dist.broadcast(flat, src=self.src, group=self.group)
            else:
                flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype,
                                   device=tensors[0].device)
                dist.broadcast(flat, src=self.src, group=self.group)
                for target, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                    target.copy_(value)


def allreduce_gradients(params: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum gradients over data-parallel trainers in one coalesced all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, value in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(value)
