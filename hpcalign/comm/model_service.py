"""A frozen model on ranks of its own: the trainers' requests and its answers.

`models.<name>.placement: exclusive` puts the reference (or PPO's reward model) on ranks
after the generators (plan/placement.py). Trainer i is served by that model's rank
i mod ranks. Per request the trainer sends a small JSON header over the control plane
(bounded waits, `comm/control.py`) and the packed batch over torch.distributed
point-to-point; the model rank answers with one float32 tensor:

    {"op": "logprobs", "temperature": t, "tensors": [[key, dtype, shape], ...]}
        -> per-token log-probs [B, T] (the reference's; what `TrainingEngine.logprobs`
           returns, so flows cannot tell a remote reference from a local one)
    {"op": "score", "tensors": [...]}  -> [B] scores at the last real token (reward model)
    {"op": "load", "path": DIR}        -> (no answer) build the reference from DIR
    {"op": "stop"}                     -> (no answer) the run is over

Headers and tensors travel in the same order on both sides, so a request is never
mistaken for another; nothing depends on the data but the shapes the header carries.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hpcalign.comm.control import TAG_MODEL, Control

_DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32,
           "bool": torch.bool}


def wire_device(backend: str, device: torch.device) -> torch.device:
    """Where point-to-point tensors travel: the GPU for NCCL, else the CPU (gloo)."""
    return device if backend == "nccl" else torch.device("cpu")


def tensor_specs(batch: dict[str, torch.Tensor]) -> list[list[Any]]:
    """[key, dtype, shape] of each tensor of a packed batch, in key order."""
    specs = []
    for key in sorted(batch):
        dtype = str(batch[key].dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"batch tensor {key!r} has dtype {dtype}: not sendable")
        specs.append([key, dtype, list(batch[key].shape)])
    return specs


def send_batch(batch: dict[str, torch.Tensor], dest: int, wire: torch.device) -> None:
    for key in sorted(batch):
        tensor = batch[key]
        if tensor.dtype == torch.bool:
            tensor = tensor.to(torch.int64)
        dist.send(tensor.contiguous().to(wire), dst=dest)


def recv_batch(specs: list[list[Any]], src: int, wire: torch.device) -> dict[str, torch.Tensor]:
    batch = {}
    for key, dtype, shape in specs:
        wire_dtype = torch.int64 if dtype == "bool" else _DTYPES[dtype]
        tensor = torch.empty(shape, dtype=wire_dtype, device=wire)
        dist.recv(tensor, src=src)
        batch[key] = tensor.to(torch.bool) if dtype == "bool" else tensor
    return batch


class RemoteModel:
    """A trainer rank's handle on an exclusive model: the methods flows call on it."""

    def __init__(self, name: str, server: int, control: Control, wire: torch.device,
                 device: torch.device) -> None:
        self.name = name
        self.server = server  # the world rank serving this trainer
        self.control = control
        self.wire = wire  # where tensors travel (CPU for gloo, the GPU for NCCL)
        self.device = device  # where the flow wants the answers

    def _ask(self, header: dict[str, Any], batch: dict[str, torch.Tensor],
             answer_shape: list[int]) -> torch.Tensor:
        self.control.send({**header, "tensors": tensor_specs(batch)}, dest=self.server,
                          tag=TAG_MODEL)
        send_batch(batch, self.server, self.wire)
        answer = torch.empty(answer_shape, dtype=torch.float32, device=self.wire)
        dist.recv(answer, src=self.server)
        return answer.to(self.device)

    def logprobs(self, batch: dict[str, torch.Tensor], *, temperature: float,
                 with_entropy: bool = False) -> tuple[torch.Tensor, None]:
        """The remote reference's per-token log-probs [B, T] (no entropy: a reference's
        is never needed)."""
        if with_entropy:
            raise ValueError(f"the exclusive {self.name} model returns log-probs only")
        shape = list(batch["input_ids"].shape)
        return self._ask({"op": "logprobs", "temperature": float(temperature)}, batch,
                         shape), None

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The remote reward model's score [B] of right-padded sequences."""
        return self._ask({"op": "score"}, {"input_ids": input_ids,
                                           "attention_mask": attention_mask},
                         [int(input_ids.shape[0])])

    def load(self, path: str) -> None:
        self.control.send({"op": "load", "path": path}, dest=self.server, tag=TAG_MODEL)
