"""Mixed precision for forward passes: `model.autocast: bf16`.

With "bf16" every forward pass (sampling, reference and policy log-probs, SFT, evaluation)
runs under `torch.autocast(<the model's device>, torch.bfloat16)`: matrix multiplications
in bfloat16 (AVX512-BF16/AMX on CPUs, tensor cores on GPUs), while the parameters, the
gradients, the optimizer state, the log-probs and the losses stay float32 (the log-probs
are taken from float32 logits, see models/logprobs.py). The backward pass runs outside the
context, as PyTorch's autocast documentation asks. "none" (the default) is plain float32,
the figure every benchmark reports first; a bf16 figure is always reported separately.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Autocast = Literal["none", "bf16"]


def autocast(model: torch.nn.Module, mode: Autocast) -> contextlib.AbstractContextManager:
    """The context a forward pass of `model` runs in (a no-op for "none")."""
    if mode == "none":
        return contextlib.nullcontext()
    if mode != "bf16":
        raise ValueError(f"autocast mode {mode!r}: expected 'none' or 'bf16'")
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)
