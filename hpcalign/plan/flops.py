"""FLOPs per token and the time of each phase (train, forward, generate, sync, offload).

FLOPs: training 6·N + 12·L·s·(a·d) per token (N = parameters in matmuls; the attention
term of Chowdhery et al. 2022 App. B, which reduces to Narayanan et al. 2021's
72·B·s·l·h²·(1 + s/6h + V/12lh) for GPT-3 shapes); forward a third of it; generation
2·N + 4·L·c·(a·d) per token at context c. Time: compute at `matmul_efficiency` of peak,
decode as max(compute, weight + KV reads at `hbm_efficiency` of HBM bandwidth), ring
collectives at link bandwidth, the 1F1B pipeline bubble (p − 1)/(v·m), and data-parallel
gradient traffic overlapped with one micro-batch. Every assumption is in docs/planner.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hpcalign.plan.hardware import Hardware
from hpcalign.plan.memory import KVPlan, Recompute, kv_bytes_per_token, params_per_gpu
from hpcalign.plan.shapes import ModelShape, ParamCount


def attention_width(shape: ModelShape) -> int:
    return shape.heads * shape.d_head


def train_flops_per_token(shape: ModelShape, counts: ParamCount, seq: int) -> float:
    """Model FLOPs of forward + backward per trained token (no recomputation counted)."""
    return 6 * counts.matmul_active + 12 * shape.layers * seq * attention_width(shape)


def forward_flops_per_token(shape: ModelShape, counts: ParamCount, seq: int) -> float:
    """Forward FLOPs per token: 2·N + 4·L·s·(a·d)."""
    return train_flops_per_token(shape, counts, seq) / 3


def decode_flops_per_token(shape: ModelShape, counts: ParamCount, context: float) -> float:
    """FLOPs of one generated token attending to `context` cached tokens."""
    return 2 * counts.matmul_active + 4 * shape.layers * context * attention_width(shape)


def recompute_flops_per_token(
    shape: ModelShape, counts: ParamCount, seq: int, recompute: Recompute
) -> float:
    """Extra hardware FLOPs of recomputation: a whole forward (full) or the attention
    core only (selective, Korthikanti et al. 2022 §5)."""
    if recompute == "full":
        return forward_flops_per_token(shape, counts, seq)
    if recompute == "selective":
        return 4 * shape.layers * seq * attention_width(shape)
    return 0.0


def ring_s(bytes_: float, group: int, gbps: float) -> float:
    """Time of a ring all-reduce of `bytes_` over `group` ranks: 2·(g − 1)/g · bytes / bw.
    A reduce-scatter or all-gather alone is half of it."""
    if group <= 1:
        return 0.0
    return 2 * (group - 1) / group * bytes_ / (gbps * 1e9)


@dataclass(frozen=True)
class PhaseTime:
    """Seconds of one phase by cause; `total` is what the step waits for."""

    compute_s: float = 0.0
    bubble_s: float = 0.0
    tp_comm_s: float = 0.0
    pp_comm_s: float = 0.0
    dp_comm_s: float = 0.0
    memory_s: float = 0.0
    """Memory-bound decode time beyond compute (weight and KV reads)."""
    model_flops: float = 0.0
    """Useful FLOPs of the phase over all its GPUs (for MFU)."""
    microbatches: int = 0

    @property
    def total_s(self) -> float:
        return (
            self.compute_s
            + self.bubble_s
            + self.tp_comm_s
            + self.pp_comm_s
            + self.dp_comm_s
            + self.memory_s
        )

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_s": self.total_s}


def train_time(
    shape: ModelShape,
    counts: ParamCount,
    hw: Hardware,
    tp: int,
    pp: int,
    dp: int,
    samples: int,
    seq: int,
    micro_batch: int,
    recompute: Recompute,
    vpp: int = 1,
    forward_only: bool = False,
) -> PhaseTime:
    """One optimizer step (or one forward pass, `forward_only`) over `samples` sequences.

    Each of the dp replicas takes ceil(samples/dp) sequences in m micro-batches. TP costs
    4 all-reduces of s·b·h bf16 per layer and micro-batch (2 forward, 2 backward; +2 with
    full recomputation; sequence parallelism moves the same bytes), not overlapped (as in
    Narayanan et al. 2021). PP sends s·b·h bf16 per micro-batch and direction over the
    network. DP reduce-scatters bf16 gradients and all-gathers parameters once per step,
    overlapped with the compute of one micro-batch (Megatron's overlap-grad-reduce and
    overlap-param-gather); only the excess shows.
    """
    per_replica = math.ceil(samples / dp)
    m = math.ceil(per_replica / micro_batch)
    tokens = per_replica * seq / (tp * pp)  # token-work of one GPU
    model_per_token = (
        forward_flops_per_token(shape, counts, seq)
        if forward_only
        else train_flops_per_token(shape, counts, seq)
    )
    extra = 0.0 if forward_only else recompute_flops_per_token(shape, counts, seq, recompute)
    rate = hw.peak_flops * hw.matmul_efficiency
    compute = tokens * (model_per_token + extra) / rate
    bubble = compute * (pp - 1) / (vpp * m)
    activation = seq * micro_batch * shape.hidden * 2  # bf16 s·b·h
    layers = math.ceil(shape.layers / pp)
    collectives = 2 if forward_only else (6 if recompute == "full" else 4)
    tp_comm = m * layers * collectives * ring_s(activation, tp, hw.link_gbps(tp))
    pp_comm = 0.0
    if pp > 1:
        sends = (1 if forward_only else 2) * (m + pp - 1)
        pp_comm = sends * activation / tp / (hw.link_gbps(2, stride=tp) * 1e9)
    dp_comm = 0.0
    if dp > 1 and not forward_only:
        grads = params_per_gpu(counts, tp, pp) * 2
        traffic = ring_s(grads, dp, hw.link_gbps(dp, stride=tp * pp))  # RS + AG = one all-reduce
        dp_comm = max(0.0, traffic - compute / m)
    model_flops = samples * seq * model_per_token
    return PhaseTime(compute, bubble, tp_comm, pp_comm, dp_comm, 0.0, model_flops, m)


def generate_time(
    shape: ModelShape,
    counts: ParamCount,
    hw: Hardware,
    tp: int,
    engines: int,
    kv: KVPlan,
    prompt_tokens: int,
    response_tokens: int,
    pp: int = 1,
) -> PhaseTime:
    """Generation of one engine's sequences (engines run in parallel, so this is the phase).

    Prefill is compute-bound: 2·N·prompt per sequence at matmul efficiency over tp·pp GPUs,
    plus 2 TP all-reduces of the prompt activations per layer. Each decode round (every
    resident sequence advances one token) is the slower of its compute and its reads: the
    weight shard plus the resident sequences' KV cache at `hbm_efficiency` of HBM
    bandwidth (the memory-bound regime of decoding), plus 2 latency-bound TP all-reduces per
    layer. With pp stages the engine keeps pp micro-batches in flight (vLLM's virtual
    engines), so the pipeline stays full but each stage reads its weights once per
    micro-batch: a round reads pp · W/(tp·pp) = W/tp per GPU — PP saves memory and
    cross-node all-reduces, not weight reads. Stage boundaries send the hidden states over
    the network. Every sequence runs to `response_tokens` (synchronous sampling waits for
    the longest). A MoE engine reads all experts (true once the batch is large).
    """
    if kv.waves == 0:
        return PhaseTime()
    rate = hw.peak_flops * hw.matmul_efficiency
    gpus = tp * pp
    tokens = kv.sequences * prompt_tokens
    prefill = tokens * forward_flops_per_token(shape, counts, prompt_tokens) / gpus / rate
    layers = math.ceil(shape.layers / pp)
    prefill_comm = 2 * layers * ring_s(tokens * shape.hidden * 2, tp, hw.link_gbps(tp))
    pp_comm = 0.0
    if pp > 1:  # each boundary sends every prompt token's hidden state once
        pp_comm = tokens * shape.hidden * 2 / (hw.link_gbps(2, stride=tp) * 1e9)
    context = prompt_tokens + response_tokens / 2  # mean over the decode
    step_compute = kv.concurrent * decode_flops_per_token(shape, counts, context) / gpus / rate
    weights = params_per_gpu(counts, tp, pp) * 2 * pp
    kv_read = kv.concurrent * context * kv_bytes_per_token(shape, tp, pp=pp)
    step_memory = (weights + kv_read) / (hw.hbm_gbps * 1e9 * hw.hbm_efficiency)
    latency = 2 * shape.layers * hw.collective_latency_us * 1e-6 if tp > 1 else 0.0
    steps = kv.waves * response_tokens
    decode_compute = steps * step_compute
    decode_memory = steps * max(0.0, step_memory - step_compute)
    model_flops = (
        engines
        * kv.sequences
        * (
            prompt_tokens * forward_flops_per_token(shape, counts, prompt_tokens)
            + response_tokens * decode_flops_per_token(shape, counts, context)
        )
    )
    return PhaseTime(
        compute_s=prefill + decode_compute,
        tp_comm_s=prefill_comm + steps * latency,
        pp_comm_s=pp_comm,
        memory_s=decode_memory,
        model_flops=model_flops,
    )


def sync_time(
    counts: ParamCount,
    hw: Hardware,
    train_tp: int,
    train_pp: int,
    gen_tp: int,
    colocated: bool,
    gen_pp: int = 1,
) -> float:
    """Weight sync: every generator GPU receives its bf16 shard 2·N/(tp_gen·pp_gen).

    One trainer replica sends its shards (2·N/(tp·pp) per GPU) and NCCL broadcasts them
    pipelined, so the time is set by the larger of one GPU's send and one GPU's receive at
    link bandwidth: the network when disaggregated, NVLink when colocated (resharding in
    place inside a node).
    """
    gbps = hw.intra_gbps if colocated else hw.inter_gbps
    total = counts.total * 2
    return max(total / (gen_tp * gen_pp), total / (train_tp * train_pp)) / (gbps * 1e9)


def offload_time(bytes_per_gpu: float, hw: Hardware) -> float:
    """Move `bytes_per_gpu` to host memory and back once (PCIe)."""
    return 2 * bytes_per_gpu / (hw.host_gbps * 1e9)
