"""`hpcalign plan --search`: enumerate layouts within the GPU budget, keep the best few.

Candidates: colocated, and disaggregated with the generators on 1/8 … 3/4 of the GPUs in
whole nodes; per candidate every TP (powers of two up to 2 nodes) and PP (divisors of the
layers) for the roles on the train GPUs — which share one layout, as in verl's hybrid
engine — and every generator TP × PP (1, 2, 4). Each candidate is a full `make_plan`; the leaders then
give the reference, reward model and critic each their own TP/PP where that helps. The
fastest feasible steps win, and each winner says what it gains over the next one.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from hpcalign.plan.hardware import hardware
from hpcalign.plan.planner import Plan, make_plan
from hpcalign.plan.shapes import ModelShape
from hpcalign.plan.spec import Layout, Layouts, PlanConfig

GENERATOR_SHARES = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)
GENERATOR_PP = (1, 2, 4)  # engines span at most a few nodes


@dataclass
class SearchResult:
    """The ranked feasible plans, and how many candidates failed for which reason."""

    best: list[Plan]
    why: list[str]
    """One line per plan in `best`: why it ranks there."""
    candidates: int
    infeasible: Counter[str]


def tp_options(shape: ModelShape, gpus_per_node: int) -> list[int]:
    """Powers of two up to two nodes that divide the attention heads."""
    options, tp = [], 1
    while tp <= 2 * gpus_per_node and tp <= shape.heads:
        if shape.heads % tp == 0:
            options.append(tp)
        tp *= 2
    return options


def pp_options(shape: ModelShape, limit: int = 64) -> list[int]:
    return [p for p in range(1, min(shape.layers, limit) + 1) if shape.layers % p == 0]


def generator_splits(gpus: int, gpus_per_node: int) -> list[int]:
    """Generator GPU counts: shares of the budget rounded to whole nodes (or GPUs when the
    budget is under two nodes), each leaving train GPUs."""
    unit = gpus_per_node if gpus >= 2 * gpus_per_node else 1
    splits = {max(unit, round(gpus * share / unit) * unit) for share in GENERATOR_SHARES}
    return sorted(s for s in splits if s < gpus)


def candidates(cfg: PlanConfig) -> list[PlanConfig]:
    """Every layout the search tries for `cfg` (same models, batch, algorithm, GPUs)."""
    hw = hardware(cfg.hardware)
    shape = cfg.models.policy.shape()
    modes: list[tuple[str, int]] = [("colocated", 0)]
    if "generator" in cfg.roles:
        modes += [("disaggregated", g) for g in generator_splits(cfg.gpus, hw.gpus_per_node)]
    gen_layouts = [(1, 1)]
    if "generator" in cfg.roles:
        gen_pps = [p for p in GENERATOR_PP if shape.layers % p == 0]
        gen_layouts = [(t, p) for t in tp_options(shape, hw.gpus_per_node) for p in gen_pps]
    out = []
    for mode, gen_gpus in modes:
        if "generator" not in cfg.roles and mode == "disaggregated":
            continue
        train_gpus = cfg.gpus - gen_gpus
        for tp in tp_options(shape, hw.gpus_per_node):
            for pp in pp_options(shape):
                if train_gpus % (tp * pp):
                    continue
                for gen_tp, gen_pp in gen_layouts:
                    gen_pool = gen_gpus or cfg.gpus
                    if gen_pool % (gen_tp * gen_pp):
                        continue
                    layouts = Layouts(
                        policy=Layout(tp=tp, pp=pp), generator=Layout(tp=gen_tp, pp=gen_pp)
                    )
                    out.append(
                        cfg.model_copy(
                            update={"mode": mode, "generator_gpus": gen_gpus, "layouts": layouts}
                        )
                    )
    return out


def _rank_key(plan: Plan) -> tuple[float, float, float]:
    # ties on the step (an overlapped step bound by generation) go to the plan with more
    # headroom on the other side, then to the lower memory peak
    return (
        round(plan.step_time_s, 3),
        plan.train_side_s,
        max(plan.peak_mem_gb.values(), default=0.0),
    )


def refine(cfg: PlanConfig, plan: Plan) -> tuple[PlanConfig, Plan]:
    """Give each other train-GPU role (reference, reward, critic) its own TP/PP when that
    ranks better, one role at a time with the others fixed (coordinate descent)."""
    hw = hardware(cfg.hardware)
    for role in ("reference", "critic", "reward"):
        if role not in cfg.roles:
            continue
        ref = cfg.models.policy if role == "reference" else (cfg.models.reward or cfg.models.policy)
        shape = ref.shape()
        for tp in tp_options(shape, hw.gpus_per_node):
            for pp in pp_options(shape):
                layouts = cfg.layouts.model_copy(update={role: Layout(tp=tp, pp=pp)})
                trial_cfg = cfg.model_copy(update={"layouts": layouts})
                trial = make_plan(trial_cfg)
                if trial.feasible and _rank_key(trial) < _rank_key(plan):
                    cfg, plan = trial_cfg, trial
    return cfg, plan


def _describe(plan: Plan) -> str:
    pol = plan.role("policy")
    text = f"{plan.config['mode']}, train TP{pol.tp}·PP{pol.pp}·DP{pol.dp}"
    for r in plan.roles:
        if r.role not in ("policy", "generator") and (r.tp, r.pp) != (pol.tp, pol.pp):
            text += f" ({r.role} TP{r.tp}·PP{r.pp}·DP{r.dp})"
    if "gen" in plan.pools:
        gen = plan.role("generator")
        pp = f"·PP{gen.pp}" if gen.pp > 1 else ""
        text += f", generators {gen.dp}×TP{gen.tp}{pp} on {plan.pools['gen']} GPUs"
    return text


def _no_phase_loss(plan: Plan, best: Plan) -> str:
    if plan.bound_by == "sequential" and best.bound_by != "sequential":
        return "its phases run in sequence, #1 overlaps generation with training"
    return "ties on every phase"


def explain(winner: Plan, other: Plan | None, behind: bool = False) -> str:
    """Why `winner` beats `other` (or, `behind`, why it trails the best plan `other`):
    the step-time gap and the two phases that differ most."""
    if other is None:
        return f"{_describe(winner)}: the only feasible layout"
    if behind:
        gap = winner.step_time_s - other.step_time_s
        deltas = sorted(
            (
                (winner.phases_s.get(p, 0.0) - other.phases_s.get(p, 0.0), p)
                for p in set(winner.phases_s) | set(other.phases_s)
            ),
            reverse=True,
        )
        losses = [f"{p} +{d:.1f} s" for d, p in deltas[:2] if d > 0.005]
        return f"{_describe(winner)}: {gap:.2f} s/step behind #1 ({'; '.join(losses) or _no_phase_loss(winner, other)})"
    gap = other.step_time_s - winner.step_time_s
    phases = set(winner.phases_s) | set(other.phases_s)
    deltas = sorted(
        ((other.phases_s.get(p, 0.0) - winner.phases_s.get(p, 0.0), p) for p in phases),
        reverse=True,
    )
    gains = [
        f"{p} {other.phases_s.get(p, 0.0):.1f}→{winner.phases_s.get(p, 0.0):.1f} s"
        for d, p in deltas[:2]
        if d > 0.005
    ]
    bits = (
        "; ".join(gains)
        if gains
        else (
            "overlaps generation with training (staleness ≥ 1)"
            if winner.bound_by != "sequential" and other.bound_by == "sequential"
            else "ties on every phase; first in search order"
        )
    )
    mem = max(winner.peak_mem_gb.values(), default=0.0)
    bound = (
        f"step bound by {winner.bound_by}"
        if winner.bound_by != "sequential"
        else "phases in sequence"
    )
    return (
        f"{_describe(winner)}: {gap:.2f} s/step faster than {_describe(other)} "
        f"({bits}); {bound}; peak {mem:.0f} GB/GPU, offload {winner.offload}"
    )


def search(cfg: PlanConfig, top: int = 5) -> SearchResult:
    """Plan every candidate; return the `top` fastest feasible ones with reasons."""
    configs = candidates(cfg)
    plans = [make_plan(c) for c in configs]
    ranked = sorted(
        (i for i, p in enumerate(plans) if plans[i].feasible), key=lambda i: _rank_key(plans[i])
    )
    # the shared layout first, then each other train role refined on the leaders
    leaders = [refine(configs[i], plans[i])[1] for i in ranked[:top]]
    feasible = sorted(leaders + [plans[i] for i in ranked[top:]], key=_rank_key)
    failed: Counter[str] = Counter()
    for p in plans:
        if not p.feasible:
            failed[_reason_kind(p.reasons[0])] += 1
    best = feasible[:top]
    why = [explain(best[0], feasible[1] if len(feasible) > 1 else None)] if best else []
    why += [explain(p, best[0], behind=True) for p in best[1:]]
    return SearchResult(best, why, len(plans), failed)


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: the reason's head, numbers replaced by N."""
    head = reason.split(" — ")[0].split(" by ")[0]
    return re.sub(r"\d+(\.\d+)?", "N", head)
