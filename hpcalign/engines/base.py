"""The two engine interfaces the roles call, and the plain data that crosses them.

Why a seam: the trainer and generator roles hold the control flow of a run (steps, weight
sync, checkpoints, stop signals); how a model computes is an engine's business. The torch
engines (`engines/torch_training.py`, `engines/torch_generation.py`) are the plain-PyTorch
code; megatron-core and vLLM add their own behind the same methods, registered by name in
`hpcalign.engines` (torchtitan's TrainSpec and verl's BaseRollout are the models).

A *training engine* owns a model (and, if it trains, its optimizer):

    engine = build_training_engine(cfg.trainer.backend, model_dir, cfg, device=..., optimizer=...)
    batch = engine.pack(prompts, completions)                # [B, T] tensors on its device
    logp, entropy = engine.logprobs(batch, temperature=1.0)  # no grad (reference, old)
    result = engine.train_step([batch, ...], loss_fn, temperature=1.0)
    engine.named_weights()                                   # [(name, tensor)] by HF name
    engine.weight_sender(bucket_mb=64, src=0, group=g).sync()  # publish to the generators
    engine.save_checkpoint(run_dir, step, state, keep) / engine.load_checkpoint(run_dir, step)

A *generation engine* samples completions and takes new weights in place:

    engine = build_generation_engine(cfg.generator.backend, model_dir, cfg, device=...)
    out = engine.generate(prompt_token_ids, SamplingParams(...), seed=7)
    receiver = NamedWeightReceiver(engine.weight_loader(), ...)  # or engine.load_weights(named)
    engine.policy_version = 3

Neither knows how it was launched: process groups and devices come in as arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

# (micro-batch index, packed micro-batch, logp [B, T] with grad, entropy [B, T] or None)
#   -> (loss to backpropagate, metrics: floats that add up over micro-batches and ranks)
LossFn = Callable[[int, dict[str, Any], Any, Any], tuple[Any, dict[str, float]]]


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """How completions are sampled; the fields and defaults of `GeneratorConfig`'s sampling."""

    samples_per_prompt: int = 8
    """Completions per prompt (a GRPO group)."""
    max_new_tokens: int = 8
    """Longest completion, in tokens (EOS included)."""
    temperature: float = 1.0
    """Softmax temperature, > 0."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 is off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 is off."""
    ignore_eos: bool = False
    """Always sample `max_new_tokens` (benchmarks: fixed-length work)."""

    def __post_init__(self) -> None:
        problems = []
        if self.samples_per_prompt < 1:
            problems.append(f"samples_per_prompt={self.samples_per_prompt} must be >= 1")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature={self.temperature} must be a finite number > 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0: off)")
        if problems:
            raise ValueError("; ".join(problems))

    def as_attrs(self) -> dict[str, int | float]:
        """The fields as shard attrs (booleans as 0/1: attrs hold strings and numbers only)."""
        return {k: int(v) if isinstance(v, bool) else v for k, v in asdict(self).items()}


@dataclass(frozen=True, slots=True)
class GenerationOutput:
    """What `GenerationEngine.generate` returns: one entry per prompt, in prompt order."""

    token_ids: list[list[int]]
    """Completion ids (the EOS that ended it included; nothing after it)."""
    logprobs: list[list[float]]
    """Log-prob of each sampled token under the temperature-scaled, untruncated policy."""
    finish_reasons: list[str]
    """"stop" (an EOS id was sampled) or "length" (max_new_tokens reached), as in vLLM."""

    @property
    def finished(self) -> list[bool]:
        return [reason == "stop" for reason in self.finish_reasons]


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSpec:
    """The optimizer a training engine builds: AdamW with global-norm clipping."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01  # torch's AdamW default
    grad_clip: float = 0.0
    """Max global gradient norm; 0 is off (then `grad_norm` is NaN)."""


@dataclass(frozen=True, slots=True)
class TrainStepResult:
    """One optimizer step: the loss function's metrics summed (over micro-batches and
    data-parallel ranks) and the global gradient norm before clipping (NaN if not clipped)."""

    metrics: dict[str, float]
    grad_norm: float


class TrainingEngine(Protocol):
    """A model that computes per-token log-probs and, if built with an optimizer, trains."""

    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    device: Any

    def pack(self, prompts: Sequence[Sequence[int]],
             completions: Sequence[Sequence[int]]) -> dict[str, Any]:
        """`input_ids`, `attention_mask`, `completion_mask` [B, T] on the engine's device."""
        ...

    def logprobs(self, batch: dict[str, Any], *, temperature: float,
                 with_entropy: bool = False) -> tuple[Any, Any]:
        """(logp [B, T], entropy [B, T] or None) of a packed batch, without gradients."""
        ...

    def train_step(self, micro_batches: Sequence[dict[str, Any]], loss_fn: LossFn, *,
                   temperature: float, with_entropy: bool = False,
                   after_backward: Callable[[], None] | None = None) -> TrainStepResult:
        """One optimizer step over `micro_batches` (gradients accumulated, all-reduced over
        the data-parallel group, clipped). `after_backward` runs after each backward."""
        ...

    def named_weights(self) -> list[tuple[str, Any]]:
        """The weights by name, as the weight sync sends them (tied weights once)."""
        ...

    def weight_sender(self, bucket_mb: float, src: int = 0, group: Any = None) -> Any:
        """The sending side of the weight sync: `.sync()` on every rank of this engine
        publishes the current weights by name (rank `src` broadcasts them to `group`, the
        generators' `NamedWeightReceiver`s)."""
        ...

    def save_model(self, out_dir: str) -> None:
        """The model as an HF directory (the input's tokenizer and config files kept)."""
        ...

    def save_checkpoint(self, run_dir: str, step: int, state: dict[str, Any],
                        keep: int) -> str:
        """Checkpoint `step` (HF weights + optimizer + RNG + `state`) atomically."""
        ...

    def load_checkpoint(self, run_dir: str, step: int) -> dict[str, Any]:
        """Restore checkpoint `step` in place; returns its state."""
        ...

    def generation_view(self) -> GenerationEngine:
        """A generation engine over this engine's current weights (greedy evaluation)."""
        ...


class GenerationEngine(Protocol):
    """A model that samples completions and takes new weights in place."""

    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    device: Any
    policy_version: int

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 seed: int, *, sample_seeds: Sequence[int] | None = None) -> GenerationOutput:
        """One completion per prompt (repeat a prompt for a group); all randomness from
        `seed`, so equal inputs on equal devices give equal outputs. With `sample_seeds`
        (one per prompt) each completion draws from its own seed instead, so it does not
        depend on the other prompts of the call (offline rollouts)."""
        ...

    def load_weights(self, named: Iterable[tuple[str, Any]]) -> None:
        """Copy named tensors into the model in place (by name, casting dtype)."""
        ...

    def weight_loader(self) -> Callable[[list[tuple[str, Any]]], None]:
        """What `NamedWeightReceiver` calls per bucket (with a `check_spec` if it can)."""
        ...
