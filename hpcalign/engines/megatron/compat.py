"""megatron-core on a machine without CUDA: the few patches it needs, in one place.

megatron-core 0.16 is written for GPUs: a handful of places ask CUDA for a device, an RNG
state or a barrier even when every tensor is on the CPU and the process groups are gloo.
`apply()` patches exactly those (verified list: ../shared/FACTS.md, "megatron-core"), and
only when `torch.cuda.is_available()` is False: with a GPU the same engine code runs on
stock megatron-core. Everything is applied once per process, at engine setup, before any
megatron model, optimizer or checkpoint exists.

    from hpcalign.engines.megatron import compat
    compat.apply()                 # no-op with CUDA
    with compat.cpu_factories():   # megatron code that builds device='cuda' tensors
        optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def needed() -> bool:
    """True where the patches apply: no usable CUDA device in this process."""
    return not torch.cuda.is_available()


def apply() -> bool:
    """Patch megatron-core's CUDA-only calls for CPU/gloo (idempotent); False with CUDA."""
    global _APPLIED
    if not needed():
        return False
    if _APPLIED:
        return True
    # WHY: megatron allocates buffers (DDP grad buffers, p2p shape tensors, checkpoint
    # flags, optimizer scalars) with device=torch.cuda.current_device(), which raises
    # without CUDA. A CPU torch.device is a valid `device=` everywhere it is used.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # WHY: dist_checkpointing and p2p communication call torch.cuda.synchronize() as a
    # barrier for CUDA streams; on the CPU every op has finished when it returns.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    _install_cpu_rng_tracker()
    _install_cpu_grad_clip()
    _APPLIED = True
    return True


class _CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker (named RNG streams for TP-region dropout and init)
    over the CPU generator: `add` records the state `seed` gives, `fork` swaps it in."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"rng state {name} (seed {seed}) already exists")
        self.seeds_.add(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _install_cpu_rng_tracker() -> None:
    # WHY: megatron's tracker stores and restores torch.cuda RNG states (torch.cuda.
    # get_rng_state, default_generators), and attention/dropout enter `fork()` on every
    # forward; the same named streams over the CPU generator keep its semantics.
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = _CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _clip_by_total_norm(parameters: Any, max_norm: float, total_norm: float,
                        use_decoupled_grad: bool = False) -> None:
    """megatron's clip_grad_by_total_norm_fp32 without its CUDA-only type assertion."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)  # megatron's (and torch's) formula
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _install_cpu_grad_clip() -> None:
    # WHY: clip_grad_by_total_norm_fp32 asserts param.grad.type() == 'torch.cuda.FloatTensor'
    # before scaling the gradients (the norm itself is computed device-agnostically).
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_by_total_norm
    optimizer.clip_grad_by_total_norm_fp32 = _clip_by_total_norm


class _CudaToCpu(TorchFunctionMode):
    """Rewrites `device='cuda'` (any index) in torch calls to the CPU; `tensor.cuda()`
    returns the tensor."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": torch.device("cpu")}
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_factories() -> Iterator[None]:
    """Inside: `device='cuda'` tensors are made on the CPU (no-op with CUDA).

    WHY: megatron's optimizer construction and `step` (grad-norm and found-inf scalars,
    multi-tensor-apply flags) create tensors with a literal device='cuda'; GPTModel's
    constructor moves the last PP stage's copy of a tied embedding with `.cuda()` before
    all-reducing it with the first stage's.
    """
    if not needed():
        yield
        return
    with _CudaToCpu():
        yield
