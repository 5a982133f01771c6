"""The plain-PyTorch value engine: PPO's critic, a causal-LM backbone with a scalar head.

The critic is an HF `AutoModelForSequenceClassification(num_labels=1)` (a reward-model
checkpoint of `hpcalign train-rm` loads whole, head included; a causal-LM directory gets
a new seeded head), read at every position instead of only the last: `values[b, t]` is
the head at position t - 1, the value of the state *before* token t is emitted, so
`values` lines up with `TrainingEngine.logprobs` (whose `logp[b, t]` is token t's
log-prob given the tokens before it) and both are read through `completion_mask`.

    critic = TorchValueEngine.build(rm_dir, device=dev, optimizer=OptimizerSpec(lr=1e-5))
    values = critic.values(batch)                        # [B, T], no grad
    result = critic.train_step([batch, ...], loss_fn)    # loss_fn(i, batch, values) -> (loss, metrics)
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from hpcalign.comm.weights import allreduce_gradients, allreduce_metrics
from hpcalign.engines.base import OptimizerSpec, TrainStepResult
from hpcalign.models.hf import load_tokenizer
from hpcalign.models.reward_model import load_reward_model, save_reward_model

ValueLossFn = Callable[[int, dict[str, torch.Tensor], torch.Tensor],
                       tuple[torch.Tensor, dict[str, float]]]


def position_values(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] float32: the scalar head at position t - 1 for every t (0 at t = 0)."""
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=batch["input_ids"],
                  attention_mask=batch["attention_mask"]).last_hidden_state  # [B, T, H]
    head = model.score(hidden).squeeze(-1).float()  # [B, T]: value after token t
    return torch.nn.functional.pad(head[:, :-1], (1, 0))  # value before token t


class TorchValueEngine:
    """A critic in this process; trains when built with an optimizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, model_dir: str,
                 optimizer: OptimizerSpec | None = None, *,
                 dp_group: dist.ProcessGroup | None = None, dp_size: int = 1) -> None:
        self.model = model
        self.dp_group, self.dp_size = dp_group, dp_size
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.spec = optimizer
        self.optimizer = (None if optimizer is None else torch.optim.AdamW(
            model.parameters(), lr=optimizer.lr, betas=optimizer.betas,
            weight_decay=optimizer.weight_decay))

    @classmethod
    def build(cls, model_dir: str, *, device: torch.device, dtype: str = "float32",
              optimizer: OptimizerSpec | None = None, seed: int = 0,
              dp_group: dist.ProcessGroup | None = None, dp_size: int = 1) -> TorchValueEngine:
        """`dp_size > 1`: one of `dp_size` data-parallel replicas in `dp_group` (gradients
        and loss metrics summed over them, as the policy's training engine does)."""
        model = load_reward_model(model_dir, dtype, seed=seed).to(device)
        return cls(model, load_tokenizer(model_dir), model_dir, optimizer, dp_group=dp_group,
                   dp_size=dp_size)

    @torch.no_grad()
    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return position_values(self.model, batch)
        finally:
            self.model.train(was_training)

    def train_step(self, micro_batches: Sequence[dict[str, torch.Tensor]],
                   loss_fn: ValueLossFn) -> TrainStepResult:
        """zero_grad; per micro-batch values with gradients, `loss_fn`, backward; clip; step
        (losses already normalised for the whole batch: gradients and metrics add up)."""
        if self.optimizer is None or self.spec is None:
            raise RuntimeError("train_step on a frozen value engine (built without an optimizer)")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            loss, metrics = loss_fn(index, batch, position_values(self.model, batch))
            loss.backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        if self.dp_size > 1:
            allreduce_gradients(list(self.model.parameters()), self.dp_group)
            totals = allreduce_metrics(totals, self.dp_group)
        grad_norm = math.nan
        if self.spec.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                             self.spec.grad_clip))
        self.optimizer.step()
        return TrainStepResult(metrics=totals, grad_norm=grad_norm)

    def save_model(self, out_dir: str) -> None:
        """An HF sequence-classification directory (the critic's own config and weights)."""
        save_reward_model(self.model, self.tokenizer, self.model_dir, out_dir)

    def save_state(self, directory: str) -> None:
        """Weights (an HF directory in `directory/model`) and optimizer state, for a
        checkpoint of the flow (`TrainingEngine.save_checkpoint(..., extra=...)`)."""
        from hpcalign.roles.checkpoint import save_optimizer

        self.save_model(os.path.join(directory, "model"))
        if self.optimizer is not None:
            save_optimizer(self.optimizer, directory)

    def load_state(self, directory: str) -> None:
        """Restore what `save_state` wrote, in place."""
        from safetensors.torch import load_file

        from hpcalign.roles.checkpoint import load_optimizer

        weights: dict[str, torch.Tensor] = {}
        for file in sorted(glob.glob(os.path.join(glob.escape(directory), "model",
                                                  "*.safetensors"))):
            weights.update(load_file(file))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{directory}: the critic checkpoint does not match the model "
                               f"(missing {missing}, unexpected {unexpected})")
        if self.optimizer is not None:
            load_optimizer(self.optimizer, directory)
