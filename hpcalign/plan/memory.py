"""Memory per GPU: weights, gradients, optimizer state, activations, KV cache.

Pure arithmetic on a `ModelShape`/`ParamCount` and a layout (tp, pp, dp). The formulas and
their sources: training state bytes per parameter from ZeRO (Rajbhandari et al. 2020,
§3.1 and Table 1) and Megatron-LM's distributed-optimizer table; activations per layer
from Korthikanti et al. 2022 (§4, Table 2); KV cache from the PagedAttention layout
(Kwon et al. 2023). Bytes are plain bytes; GB = 1e9 bytes. See `docs/planner.md`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from hpcalign.plan.shapes import ModelShape, ParamCount

Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each kind of training state (Megatron's bf16 defaults)."""

    weights: float = 2.0
    """bf16 parameters."""
    grads: float = 4.0
    """fp32 main-gradient buffer (Megatron accumulates grads in fp32); 2 for bf16 grads."""
    optimizer: float = 12.0
    """fp32 master weights + Adam m + v (ZeRO's K = 12)."""


def params_per_gpu(counts: ParamCount, tp: int, pp: int) -> float:
    """Parameters held by the fullest GPU: the first or last pipeline stage.

    Layers split evenly over `pp` stages (the fullest stage gets ceil(L/pp)); matrices and
    the vocabulary-parallel embedding/head split over `tp`; norms are replicated. The
    first stage holds the embedding, the last the output head (Megatron keeps a copy of a
    tied embedding on the last stage too, so tying saves memory only when pp = 1).
    """
    layers = math.ceil(counts.layers / pp)
    per_layer = (counts.attention_per_layer + counts.mlp_per_layer) / tp + counts.norms_per_layer
    body = layers * per_layer
    head = (counts.output or counts.embedding) / tp
    if pp == 1:
        output = counts.output / tp  # tied: the head *is* the embedding, stored once
        return body + counts.embedding / tp + output + counts.final_norm
    return body + max(counts.embedding / tp, head + counts.final_norm)


def state_bytes_per_param(dp: int, distributed_optimizer: bool, state: StateBytes) -> float:
    """Training-state bytes per (locally held) parameter.

    Without sharding: weights + grads + optimizer (2 + 4 + 12 = 18 for Megatron's bf16
    defaults; ZeRO's mixed-precision Adam with fp16 grads is 2 + 2 + 12 = 16). Megatron's
    distributed optimizer (= ZeRO stage 1) shards the optimizer state over data parallel:
    optimizer / dp.
    """
    optimizer = state.optimizer / dp if distributed_optimizer else state.optimizer
    return state.weights + state.grads + optimizer


def zero_bytes_per_param(stage: int, dp: int, state: StateBytes) -> float:
    """ZeRO stages 0–3 (Rajbhandari et al. 2020, Figure 1): what is divided by dp.

    Stage 1 shards the optimizer state, stage 2 also the gradients, stage 3 also the
    weights. Used to check the planner against the paper's Table 1.
    """
    shards = {0: (1, 1, 1), 1: (1, 1, dp), 2: (1, dp, dp), 3: (dp, dp, dp)}[stage]
    return state.weights / shards[0] + state.grads / shards[1] + state.optimizer / shards[2]


def activation_bytes_per_layer(
    shape: ModelShape,
    seq: int,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    recompute: Recompute,
) -> float:
    """Activations one layer keeps for the backward pass of one micro-batch (bf16).

    Korthikanti et al. 2022, Table 2, with s = seq, b = micro_batch, h = hidden, a = heads,
    t = tp: no parallelism s·b·h·(34 + 5·a·s/h); TP alone s·b·h·(10 + 24/t + 5·a·s/(h·t));
    TP + sequence parallel s·b·h/t·(34 + 5·a·s/h); selective recomputation drops the
    5·a·s/h attention term; full recomputation keeps only the layer input 2·s·b·h (/t with
    sequence parallelism). The 34 assumes an MLP of 4·h (GPT-3); the planner keeps it for
    SwiGLU models, see docs/planner.md.
    """
    s, b, h, a, t = seq, micro_batch, shape.hidden, shape.heads, tp
    sbh = s * b * h
    attention = 0.0 if recompute == "selective" else 5 * a * s / h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    if sequence_parallel or t == 1:
        return sbh / t * (34 + attention)
    return sbh * (10 + 24 / t + attention / t)


def logits_bytes(shape: ModelShape, seq: int, micro_batch: int, tp: int) -> float:
    """fp32 logits of the cross-entropy on the last stage, vocabulary-parallel: 4·s·b·V/t."""
    return 4 * seq * micro_batch * shape.vocab / tp


def activation_bytes(
    shape: ModelShape,
    seq: int,
    micro_batch: int,
    tp: int,
    pp: int,
    microbatches: int,
    sequence_parallel: bool,
    recompute: Recompute,
    vpp: int = 1,
) -> float:
    """Peak activation bytes on the fullest pipeline stage under the 1F1B schedule.

    The first stage holds min(m, p) micro-batches of its L/p layers — L layers' worth once
    m ≥ p, independent of p (Korthikanti §4.2.3); the interleaved schedule with `vpp`
    virtual stages multiplies that by 1 + (p − 1)/(p·vpp). The last stage holds one
    micro-batch of its layers plus the logits.
    """
    per_layer = activation_bytes_per_layer(
        shape, seq, micro_batch, tp, sequence_parallel, recompute
    )
    layers_per_stage = math.ceil(shape.layers / pp)
    in_flight = min(microbatches, pp)
    interleave = 1 + (pp - 1) / (pp * vpp) if vpp > 1 else 1.0
    first = layers_per_stage * per_layer * in_flight * interleave
    logits = logits_bytes(shape, seq, micro_batch, tp)
    if pp == 1:
        return first + logits
    return max(first, layers_per_stage * per_layer + logits)


def forward_activation_bytes(shape: ModelShape, seq: int, micro_batch: int, tp: int) -> float:
    """Working set of a forward-only pass: one layer's activations plus the logits."""
    per_layer = activation_bytes_per_layer(shape, seq, micro_batch, tp, True, "selective")
    return per_layer + logits_bytes(shape, seq, micro_batch, tp)


def kv_bytes_per_token(
    shape: ModelShape, tp: int, bytes_per_elem: float = 2.0, pp: int = 1
) -> float:
    """KV cache per token on one GPU: 2 (K and V) · ceil(L/pp) · ceil(n_kv/t) · d_head · bytes.

    KV heads split over TP; when TP exceeds the KV heads each GPU keeps a replica of one
    head (vLLM does the same), hence the ceil. A pipeline stage caches its own layers.
    """
    kv_heads = math.ceil(shape.kv_heads / tp)
    return 2 * math.ceil(shape.layers / pp) * kv_heads * shape.d_head * bytes_per_elem


def kv_tokens(prompt_tokens: int, response_tokens: int, block_tokens: int = 16) -> int:
    """Cache slots one sequence occupies: PagedAttention rounds up to whole blocks."""
    return math.ceil((prompt_tokens + response_tokens) / block_tokens) * block_tokens


@dataclass(frozen=True)
class KVPlan:
    """How a generator engine fits its sequences into the KV cache."""

    bytes_per_seq: float
    capacity_bytes: float
    sequences: int
    """Sequences this engine generates per step."""
    concurrent: int
    """Sequences resident at once (≤ sequences; fewer when the cache is short)."""
    waves: int

    @property
    def used_bytes(self) -> float:
        return self.concurrent * self.bytes_per_seq


def kv_plan(
    shape: ModelShape,
    tp: int,
    sequences: int,
    prompt_tokens: int,
    response_tokens: int,
    free_bytes: float,
    block_tokens: int = 16,
    pp: int = 1,
) -> KVPlan:
    """Concurrency of one engine: all its sequences at once if the cache holds them, else
    in waves of as many as fit (vLLM's scheduler preempts beyond that; waves model it)."""
    per_seq = kv_bytes_per_token(shape, tp, pp=pp) * kv_tokens(
        prompt_tokens, response_tokens, block_tokens
    )
    fit = int(max(free_bytes, 0) // per_seq)
    concurrent = min(sequences, fit)
    waves = math.ceil(sequences / concurrent) if concurrent else 0
    return KVPlan(per_seq, free_bytes, sequences, concurrent, waves)
