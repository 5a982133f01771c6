"""Text of a plan: the terminal table and the markdown report (`plan.md`).

Pure functions from `Plan` (and a `SearchResult`) to strings, so the CLI only prints and
writes them; tests read the same strings.
"""

from __future__ import annotations

from hpcalign.plan.planner import Plan
from hpcalign.plan.search import SearchResult

MEMORY_KINDS = ("weights", "grads", "optimizer", "activations", "workspace", "kv_cache")


def _gb(value: float) -> str:
    return f"{value:.1f}" if value else "-"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def role_rows(plan: Plan) -> list[list[str]]:
    """One row per role: layout, memory by kind (GB/GPU), model PFLOP and seconds per step."""
    rows = []
    for r in plan.roles:
        phase = r.time.get("total_s", 0.0) + r.time.get("forward_total_s", 0.0)
        pflop = (r.time.get("model_flops", 0.0) + r.time.get("forward_model_flops", 0.0)) / 1e15
        rows.append(
            [
                r.role,
                r.model,
                _fmt_params(r.params),
                str(r.gpus),
                f"{r.tp}/{r.pp}/{r.dp}",
                *(_gb(r.memory_gb.get(k, 0.0)) for k in MEMORY_KINDS),
                _gb(r.peak_gb),
                f"{pflop:.4g}" if pflop else "-",
                f"{phase:.2f}" if phase else "-",
            ]
        )
    return rows


ROLE_HEADER = [
    "role",
    "model",
    "params",
    "GPUs",
    "TP/PP/DP",
    "weights",
    "grads",
    "optim",
    "activ",
    "work",
    "KV",
    "peak GB",
    "PFLOP",
    "time s",
]


def table(header: list[str], rows: list[list[str]]) -> str:
    """A fixed-width text table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def summary_lines(plan: Plan) -> list[str]:
    cfg = plan.config
    pools = ", ".join(f"{k} {v}" for k, v in plan.pools.items())
    lines = [
        f"{cfg['algorithm']} on {plan.gpus} × {plan.hardware} ({cfg['mode']}; GPUs: {pools}); "
        f"batch {cfg['batch']['prompts']}×{cfg['batch']['samples_per_prompt']}, "
        f"{cfg['batch']['prompt_tokens']}+{cfg['batch']['response_tokens']} tokens"
    ]
    if not plan.feasible:
        lines.append("INFEASIBLE:")
        lines += [f"  - {r}" for r in plan.reasons]
        return lines
    phases = ", ".join(f"{k} {v:.2f}" for k, v in plan.phases_s.items())
    lines.append(f"phases (s): {phases}")
    lines.append(
        f"step {plan.step_time_s:.2f} s ({plan.bound_by}), {plan.tokens_per_s_per_gpu:.1f} tokens/s/GPU, "
        f"MFU {plan.mfu:.1%} (policy training {plan.train_mfu:.1%}), offload {plan.offload}, "
        f"peak " + ", ".join(f"{k} {v:.1f} GB" for k, v in plan.peak_mem_gb.items())
    )
    for r in plan.roles:
        lines += [f"note: {r.role}: {n}" for n in r.notes]
    return lines


def plan_text(plan: Plan) -> str:
    """What `hpcalign plan` prints."""
    return table(ROLE_HEADER, role_rows(plan)) + "\n\n" + "\n".join(summary_lines(plan))


def search_text(result: SearchResult) -> str:
    lines = [f"searched {result.candidates} layouts, {len(result.best)} best feasible:"]
    for i, (plan, why) in enumerate(zip(result.best, result.why), 1):
        lines.append(
            f"{i}. {plan.step_time_s:8.2f} s/step  {plan.tokens_per_s_per_gpu:7.1f} tok/s/GPU  {why}"
        )
    if result.infeasible:
        lines.append(
            "infeasible: " + "; ".join(f"{n}× {k}" for k, n in result.infeasible.most_common(6))
        )
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def plan_markdown(plan: Plan, result: SearchResult | None = None, title: str = "Plan") -> str:
    """The markdown report written next to plan.json."""
    parts = [
        f"# {title}",
        "",
        *summary_lines(plan),
        "",
        "Memory in GB per GPU on the fullest GPU of each role; time in seconds per step.",
        "",
        _md_table(ROLE_HEADER, role_rows(plan)),
    ]
    if result is not None:
        parts += ["", "## Search", "", search_text(result).replace("\n", "\n\n")]
    parts += ["", "Formulas, sources and assumptions: docs/planner.md.", ""]
    return "\n".join(parts)
