"""One plan: per-role layout, memory per GPU, time per phase, step totals, feasibility.

`make_plan(PlanConfig)` is pure arithmetic (no I/O beyond reading an HF config.json) and
the only place that checks parallel degrees against a model and a GPU count; the search
and the sweep call it once per candidate. Every infeasible plan says why, with numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcalign.plan import flops, memory
from hpcalign.plan.hardware import Hardware, hardware
from hpcalign.plan.shapes import ModelShape, count_params
from hpcalign.plan.spec import PlanConfig

GB = 1e9
TRAINABLE = ("policy", "critic")


@dataclass
class RolePlan:
    """One role: what it holds per GPU and how long its phase takes."""

    role: str
    model: str
    params: int
    gpus: int
    tp: int
    pp: int
    dp: int
    vpp: int = 1
    memory_gb: dict[str, float] = field(default_factory=dict)
    """weights, grads, optimizer, activations, kv_cache: GB on the fullest GPU."""
    time: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kv: memory.KVPlan | None = None
    """Generators: how the KV cache holds their sequences."""

    @property
    def resident_gb(self) -> float:
        """State that lives across phases (weights, grads, optimizer)."""
        return sum(self.memory_gb.get(k, 0.0) for k in ("weights", "grads", "optimizer"))

    @property
    def peak_gb(self) -> float:
        return sum(self.memory_gb.values())


@dataclass
class Plan:
    """A whole plan; `feasible` is False when any reason is listed."""

    config: dict[str, Any]
    hardware: str
    gpus: int
    pools: dict[str, int]
    roles: list[RolePlan]
    reasons: list[str] = field(default_factory=list)
    phases_s: dict[str, float] = field(default_factory=dict)
    step_time_s: float = 0.0
    tokens_per_s_per_gpu: float = 0.0
    mfu: float = 0.0
    train_mfu: float = 0.0
    peak_mem_gb: dict[str, float] = field(default_factory=dict)
    offload: str = "none"
    train_side_s: float = 0.0
    """Train-GPU work per step (forwards, updates, offload)."""
    bound_by: str = ""
    """What sets the step: 'generation' or 'training' (overlapped), or 'sequential'."""

    @property
    def feasible(self) -> bool:
        return not self.reasons

    def role(self, name: str) -> RolePlan:
        return next(r for r in self.roles if r.role == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "feasible": self.feasible,
            "reasons": self.reasons,
            "hardware": self.hardware,
            "gpus": self.gpus,
            "pools": self.pools,
            "offload": self.offload,
            "bound_by": self.bound_by,
            "train_side_s": self.train_side_s,
            "step_time_s": self.step_time_s,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "mfu": self.mfu,
            "train_mfu": self.train_mfu,
            "phases_s": self.phases_s,
            "peak_mem_gb": self.peak_mem_gb,
            "roles": [
                {
                    "role": r.role,
                    "model": r.model,
                    "params": r.params,
                    "gpus": r.gpus,
                    "tp": r.tp,
                    "pp": r.pp,
                    "dp": r.dp,
                    "vpp": r.vpp,
                    "memory_gb": r.memory_gb,
                    "peak_gb": r.peak_gb,
                    "time": r.time,
                    "reasons": r.reasons,
                    "notes": r.notes,
                }
                for r in self.roles
            ],
            "config": self.config,
        }


def layout_reasons(
    shape: ModelShape, tp: int, pp: int, vpp: int, pool: int, role: str
) -> list[str]:
    """Why (tp, pp, vpp) cannot hold `shape` on `pool` GPUs; empty when it can."""
    reasons = []
    if tp > shape.heads:
        reasons.append(f"{role}: TP {tp} is larger than the {shape.heads} attention heads")
    elif shape.heads % tp:
        reasons.append(f"{role}: TP {tp} does not divide the {shape.heads} attention heads")
    elif tp < shape.kv_heads and shape.kv_heads % tp:
        reasons.append(f"{role}: TP {tp} does not divide the {shape.kv_heads} KV heads")
    elif tp > shape.kv_heads and tp % shape.kv_heads:
        reasons.append(f"{role}: TP {tp} is not a multiple of the {shape.kv_heads} KV heads")
    if shape.layers % (pp * vpp):
        what = f"PP {pp}" + (f" × VPP {vpp}" if vpp > 1 else "")
        reasons.append(f"{role}: {what} does not divide the {shape.layers} layers")
    if pool % (tp * pp):
        reasons.append(f"{role}: TP·PP = {tp * pp} does not divide its {pool} GPUs")
    return reasons


def _scaled(phase: flops.PhaseTime, times: int) -> dict[str, float]:
    return {k: v * times if k != "microbatches" else v for k, v in phase.as_dict().items()}


def pools_of(cfg: PlanConfig) -> tuple[dict[str, int], list[str]]:
    """GPUs of the train and generator pools (the same GPUs when colocated), and why not."""
    if "generator" not in cfg.roles:
        return {"train": cfg.gpus}, []
    if cfg.mode == "colocated":
        return {"train": cfg.gpus, "gen": cfg.gpus}, []
    gen = cfg.generator_gpus or max(1, cfg.gpus // 4)
    if gen >= cfg.gpus:
        return {"train": 0, "gen": gen}, [
            f"generator_gpus={gen} leaves no train GPUs of gpus={cfg.gpus}"
        ]
    return {"train": cfg.gpus - gen, "gen": gen}, []


def _role_memory(
    cfg: PlanConfig, hw: Hardware, rp: RolePlan, shape: ModelShape, samples: int
) -> None:
    """Fill `rp.memory_gb` (and KV reasons for generators)."""
    counts = count_params(shape)
    tr, b = cfg.training, cfg.batch
    if rp.role == "generator":
        weights = memory.params_per_gpu(counts, rp.tp, rp.pp) * 2
        free = (
            hw.mem_bytes * cfg.generation.gpu_memory_utilization
            - weights
            - cfg.generation.workspace_gb * GB
        )
        sequences = math.ceil(samples / rp.dp)
        kv = memory.kv_plan(
            shape,
            rp.tp,
            sequences,
            b.prompt_tokens,
            b.response_tokens,
            free,
            cfg.generation.block_tokens,
            pp=rp.pp,
        )
        rp.memory_gb = {
            "weights": weights / GB,
            "workspace": cfg.generation.workspace_gb,
            "kv_cache": kv.used_bytes / GB,
        }
        rp.time["kv_waves"] = kv.waves
        rp.time["concurrent_sequences"] = kv.concurrent
        if kv.concurrent == 0:
            rp.reasons.append(
                f"generator: OOM — one sequence needs {kv.bytes_per_seq / GB:.2f} GB of KV cache, "
                f"{max(free, 0) / GB:.1f} GB free after {weights / GB:.1f} GB of weights at TP {rp.tp}"
                + (f" × PP {rp.pp}" if rp.pp > 1 else "")
            )
        elif kv.waves > 1:
            rp.notes.append(
                f"KV cache holds {kv.concurrent} of {sequences} sequences: {kv.waves} waves"
            )
        rp.kv = kv
        return
    p = memory.params_per_gpu(counts, rp.tp, rp.pp)
    seq = b.seq
    if rp.role in TRAINABLE:
        per_replica = math.ceil(samples / rp.dp)
        m = math.ceil(per_replica / b.micro_batch)
        opt = tr.optimizer_bytes / rp.dp if tr.distributed_optimizer else tr.optimizer_bytes
        acts = memory.activation_bytes(
            shape, seq, b.micro_batch, rp.tp, rp.pp, m, tr.sequence_parallel, tr.recompute, rp.vpp
        )
        rp.memory_gb = {
            "weights": p * tr.weight_bytes / GB,
            "grads": p * tr.grad_bytes / GB,
            "optimizer": p * opt / GB,
            "activations": acts / GB,
        }
    else:
        acts = memory.forward_activation_bytes(shape, seq, b.micro_batch, rp.tp)
        rp.memory_gb = {"weights": p * 2 / GB, "activations": acts / GB}


def _pool_memory(roles: list[RolePlan], capacity_gb: float) -> tuple[float, str, float]:
    """Peak GB per GPU of roles that time-share a pool, the offload level, and the GB per
    GPU moved to host and back per step.

    Levels, cheapest first: none (all state resident); optimizer (grads and optimizer
    state of the trainable roles go to host while other roles run); all (only the running
    role is resident, as in verl's hybrid engine).
    """
    transient = {r.role: r.peak_gb - r.resident_gb for r in roles}
    total_resident = sum(r.resident_gb for r in roles)
    peak = total_resident + max(transient.values())
    if peak <= capacity_gb or len(roles) == 1:
        return peak, "none", 0.0
    weights = {r.role: r.memory_gb.get("weights", 0.0) for r in roles}
    states = {r.role: r.resident_gb - weights[r.role] for r in roles}
    peak = max(sum(weights.values()) + states[r.role] + transient[r.role] for r in roles)
    if peak <= capacity_gb:
        return peak, "optimizer", sum(states.values())
    peak = max(r.peak_gb for r in roles)
    return peak, "all", total_resident


def make_plan(cfg: PlanConfig, base_dir: Path | None = None) -> Plan:
    """Plan `cfg`: memory and time of every role, step totals, and every reason it fails."""
    hw = hardware(cfg.hardware)
    policy_shape = cfg.models.policy.shape(base_dir)
    reward_shape = cfg.models.reward.shape(base_dir) if cfg.models.reward else policy_shape
    pools, reasons = pools_of(cfg)
    b = cfg.batch
    samples = b.prompts * 2 if cfg.algorithm == "dpo" else b.samples
    plan = Plan(cfg.model_dump(), hw.name, cfg.gpus, pools, [], reasons)
    shapes = {
        "generator": policy_shape,
        "reference": policy_shape,
        "policy": policy_shape,
        "reward": reward_shape,
        "critic": reward_shape,
    }
    for role in cfg.roles:
        lay = cfg.layout(role)
        shape = shapes[role]
        pool = pools["gen" if role == "generator" else "train"]
        rp = RolePlan(
            role,
            shape.name,
            count_params(shape).total,
            pool,
            lay.tp,
            lay.pp,
            max(pool // (lay.tp * lay.pp), 0),
            lay.vpp,
        )
        rp.reasons = layout_reasons(shape, lay.tp, lay.pp, lay.vpp, pool, role) if pool else []
        if rp.dp > samples:
            rp.reasons.append(f"{role}: DP {rp.dp} exceeds the {samples} sequences per step")
        plan.roles.append(rp)
        if rp.reasons or rp.dp == 0:
            continue
        _role_memory(cfg, hw, rp, shape, samples)
    for rp in plan.roles:
        plan.reasons.extend(rp.reasons)
    if not plan.feasible:
        return plan
    capacity = hw.mem_gb * hw.usable_mem_fraction
    train_roles = [r for r in plan.roles if r.role != "generator"]
    gen_roles = [r for r in plan.roles if r.role == "generator"]
    offload_gb = 0.0
    if cfg.mode == "colocated":
        plan.peak_mem_gb["all"], plan.offload, offload_gb = _pool_memory(plan.roles, capacity)
    else:
        plan.peak_mem_gb["train"], plan.offload, offload_gb = _pool_memory(train_roles, capacity)
        for g in gen_roles:
            plan.peak_mem_gb["gen"] = g.peak_gb
    members = {"all": plan.roles, "train": train_roles, "gen": gen_roles}
    for pool_name, peak in plan.peak_mem_gb.items():
        if peak > capacity:
            worst = max(members[pool_name], key=lambda r: r.peak_gb)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in worst.memory_gb.items())
            plan.reasons.append(
                f"OOM on the {pool_name} GPUs by {peak - capacity:.1f} GB: {worst.role} alone needs "
                f"{worst.peak_gb:.1f} GB per GPU ({parts}) of {capacity:.1f} usable"
            )
    if not plan.feasible:
        return plan
    _times(cfg, hw, plan, shapes, samples, offload_gb)
    return plan


def _times(
    cfg: PlanConfig,
    hw: Hardware,
    plan: Plan,
    shapes: dict[str, ModelShape],
    samples: int,
    offload_gb: float,
) -> None:
    b, tr = cfg.batch, cfg.training
    total_flops = 0.0
    train_side = 0.0
    for rp in plan.roles:
        shape = shapes[rp.role]
        counts = count_params(shape)
        if rp.role == "generator":
            phase = flops.generate_time(
                shape, counts, hw, rp.tp, rp.dp, rp.kv, b.prompt_tokens, b.response_tokens, rp.pp
            )
            rp.time.update(phase.as_dict())
            plan.phases_s["generate"] = phase.total_s
            total_flops += phase.model_flops
            continue
        # the same layout and batch for the forward-only and the training estimate
        role_time = functools.partial(flops.train_time, shape, counts, hw, rp.tp, rp.pp, rp.dp,
                                      samples, b.seq, b.micro_batch, tr.recompute, rp.vpp)
        forward_phase = {"reference": "reference_logprobs", "reward": "reward_scores",
                         "critic": "critic_values"}.get(rp.role)
        if forward_phase:
            fwd = role_time(forward_only=True)
            plan.phases_s[forward_phase] = fwd.total_s
            train_side += fwd.total_s
            total_flops += fwd.model_flops
            rp.time.update({f"forward_{k}": v for k, v in fwd.as_dict().items()})
        if rp.role in TRAINABLE:
            step = role_time()
            scaled = _scaled(step, b.updates_per_step)
            rp.time.update(scaled)
            plan.phases_s[f"train_{rp.role}"] = scaled["total_s"]
            train_side += scaled["total_s"]
            total_flops += scaled["model_flops"]
            if rp.role == "policy":
                plan.train_mfu = step.model_flops / (step.total_s * rp.gpus * hw.peak_flops)
    if offload_gb:
        plan.phases_s["offload"] = flops.offload_time(offload_gb * GB, hw)
        train_side += plan.phases_s["offload"]
    gen = plan.phases_s.get("generate", 0.0)
    if "generator" in cfg.roles:
        gen_rp, pol = plan.role("generator"), plan.role("policy")
        plan.phases_s["weight_sync"] = flops.sync_time(
            count_params(shapes["policy"]),
            hw,
            pol.tp,
            pol.pp,
            gen_rp.tp,
            cfg.mode == "colocated",
            gen_rp.pp,
        )
    sync = plan.phases_s.get("weight_sync", 0.0)
    overlap = cfg.mode == "disaggregated" and cfg.staleness >= 1
    plan.step_time_s = (max(gen, train_side) if overlap else gen + train_side) + sync
    plan.train_side_s = train_side
    if not overlap or not gen:
        plan.bound_by = "sequential"
    else:
        plan.bound_by = "generation" if gen >= train_side else "training"
    plan.tokens_per_s_per_gpu = samples * b.seq / plan.step_time_s / cfg.gpus
    plan.mfu = total_flops / (plan.step_time_s * cfg.gpus * hw.peak_flops)
