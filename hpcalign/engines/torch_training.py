"""The plain-PyTorch training engine: an HF causal LM, AdamW, plain data parallelism.

Per-token log-probs come from `hpcalign.models.logprobs.token_logprobs` (chunked over the
lm_head, float32 softmax); `train_step` runs the loss over micro-batches, accumulating
gradients, sums them over the data-parallel trainer group in one coalesced all-reduce
(every rank then holds the same gradients and takes the same AdamW step), clips the global
norm and steps. Checkpoints are `hpcalign.roles.checkpoint`'s (HF weights + optimizer +
RNG, no pickles); the HF directory keeps the input model's tokenizer and config files.

    engine = TorchTrainingEngine.build(model_dir, cfg, device=dev,
                                       optimizer=OptimizerSpec(lr=3e-4, grad_clip=1.0))
    result = engine.train_step(micro_batches, loss_fn, temperature=1.0, with_entropy=True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from hpcalign.comm.weights import (
    NamedWeightSender,
    allreduce_gradients,
    allreduce_metrics,
    coalesce_in_place,
)
from hpcalign.config.schema import Config
from hpcalign.engines.base import LossFn, OptimizerSpec, TrainStepResult
from hpcalign.engines.torch_generation import TorchGenerationEngine
from hpcalign.models.hf import eos_token_ids, load_model, padding_id, save_model
from hpcalign.models.logprobs import compiled_body, pack_sequences, token_logprobs
from hpcalign.models.precision import autocast
from hpcalign.roles.checkpoint import load_checkpoint, save_checkpoint


class TorchTrainingEngine:
    """One HF causal LM in this process; trains when built with an optimizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, model_dir: str, *,
                 autocast_mode: str = "none", optimizer: OptimizerSpec | None = None,
                 dp_group: dist.ProcessGroup | None = None, dp_size: int = 1,
                 compile_model: bool = False) -> None:
        self.model = model
        # model.compile: the decoder body compiled (compiles on first use); None = eager
        self.body = compiled_body(model) if compile_model else None
        self.tokenizer = tokenizer
        self.model_dir = model_dir  # where the tokenizer and config files are copied from
        self.autocast_mode = autocast_mode
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.pad_token_id = padding_id(tokenizer, self.eos_token_ids)
        self.dp_group, self.dp_size = dp_group, dp_size
        self.spec = optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        if optimizer is None:
            self.model.requires_grad_(False)
            self.params: list[torch.nn.Parameter] = []
        else:
            self.model.train()
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(self.params, lr=optimizer.lr,
                                               betas=tuple(optimizer.betas),
                                               weight_decay=optimizer.weight_decay)

    @classmethod
    def build(cls, model_dir: str, cfg: Config, *, device: torch.device,
              optimizer: OptimizerSpec | None = None, dp_group: dist.ProcessGroup | None = None,
              dp_size: int = 1) -> TorchTrainingEngine:
        """The model of `model_dir` on `device`; frozen (a reference) without `optimizer`.

        `dp_size > 1`: this is one of `dp_size` data-parallel replicas in `dp_group`.
        """
        model, tokenizer = load_model(model_dir, cfg.model.dtype)
        model.to(device)
        return cls(model, tokenizer, model_dir, autocast_mode=cfg.model.autocast,
                   optimizer=optimizer, dp_group=dp_group, dp_size=dp_size,
                   compile_model=cfg.model.compile)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------ compute
    def pack(self, prompts: Sequence[Sequence[int]],
             completions: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-padded [B, T] `input_ids`, `attention_mask`, `completion_mask` on the device."""
        batch = pack_sequences(list(prompts), list(completions), self.pad_token_id)
        return {key: value.to(self.device) for key, value in batch.items()}

    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor], *, temperature: float,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logp, entropy) [B, T] float32 without gradients (reference / old log-probs)."""
        with autocast(self.model, self.autocast_mode):
            return token_logprobs(self.model, batch, temperature, with_entropy=with_entropy,
                                  body=self.body)

    def train_step(self, micro_batches: Sequence[dict[str, torch.Tensor]], loss_fn: LossFn, *,
                   temperature: float, with_entropy: bool = False,
                   after_backward: Callable[[], None] | None = None) -> TrainStepResult:
        """zero_grad; per micro-batch forward, `loss_fn`, backward; all-reduce; clip; step.

        `loss_fn`'s losses and metrics must already be normalised for the whole global
        batch (e.g. divided by the global token count): gradients and metrics are summed.
        """
        if self.optimizer is None or self.spec is None:
            raise RuntimeError("train_step on a frozen engine (built without an optimizer)")
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            with autocast(self.model, self.autocast_mode):
                logp, entropy = token_logprobs(self.model, batch, temperature,
                                               with_entropy=with_entropy, body=self.body)
            loss, metrics = loss_fn(index, batch, logp, entropy)
            loss.backward()
            if after_backward is not None:
                after_backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        if self.dp_size > 1:
            allreduce_gradients(self.params, self.dp_group)
            totals = allreduce_metrics(totals, self.dp_group)
        grad_norm = math.nan
        if self.spec.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.spec.grad_clip))
        self.optimizer.step()
        return TrainStepResult(metrics=totals, grad_norm=grad_norm)

    # ------------------------------------------------------------ weights and state
    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Parameters by name (a tied weight once, under its first name)."""
        return list(self.model.named_parameters())

    def weight_sender(self, bucket_mb: float, src: int = 0,
                      group: dist.ProcessGroup | None = None) -> NamedWeightSender:
        """The weight sync's sending side (`.sync()` on rank `src`). The parameters are
        laid out bucket by bucket first (`coalesce_in_place`), so a sync broadcasts them
        where they lie: no flattening copy of the model at every version."""
        coalesce_in_place(self.named_weights(), bucket_mb)
        return NamedWeightSender(self.named_weights, bucket_mb, src=src, group=group)

    def save_model(self, out_dir: str) -> None:
        """An HF directory: safetensors weights + the input model's other files as they were."""
        save_model(self.model, self.tokenizer, out_dir, source_dir=self.model_dir)

    def save_checkpoint(self, run_dir: str, step: int, state: dict[str, Any], keep: int,
                        extra: Callable[[str], None] | None = None) -> str:
        """`extra(dir)`: the flow's other trainable models, into the same atomic checkpoint."""
        if self.optimizer is None:
            raise RuntimeError("a frozen engine has no training state to checkpoint")
        return save_checkpoint(run_dir, step, self.save_model, self.optimizer, state, keep,
                               extra=extra)

    def load_checkpoint(self, run_dir: str, step: int) -> dict[str, Any]:
        if self.optimizer is None:
            raise RuntimeError("a frozen engine has no training state to restore")
        return load_checkpoint(run_dir, step, self.model, self.optimizer)

    def generation_view(self) -> TorchGenerationEngine:
        """Sampling from this very model (shared weights: no copy, always current)."""
        return TorchGenerationEngine(self.model, self.tokenizer, autocast_mode=self.autocast_mode,
                                     eos_ids=self.eos_token_ids, pad_id=self.pad_token_id)
