"""Study results: planned rows per grid point, measured figures merged in, markdown + PNGs.

`plan_points` plans every point of a study (what `hpcalign plan STUDY` and `hpcalign
sweep` write to plan.json); `collect` merges the array tasks' `points/NNNN/measured.json`;
`write_report` writes `report.md` and three plots: measured vs planned step time,
measured vs planned memory, and the scaling curve (tokens/s/GPU against GPUs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcalign.plan.planner import make_plan
from hpcalign.plan.render import _md_table, table
from hpcalign.plan.spec import parse_plan
from hpcalign.plan.study import Study, measure_reason, points

Row = dict[str, Any]


def plan_points(study: Study, gpu: str | None = None, gpus: int | None = None) -> list[Row]:
    """One row per grid point with the planned figures and whether it will be measured."""
    rows = []
    for point in points(study):
        cfg = point.config
        if gpu or gpus:
            cfg = parse_plan(
                {
                    **cfg.model_dump(),
                    **({"hardware": gpu} if gpu else {}),
                    **({"gpus": gpus} if gpus else {}),
                },
                "study",
            )
            point.config = cfg
        plan = make_plan(cfg)
        reason = measure_reason(study, point, plan.feasible)
        planned = plan.as_dict()
        planned.pop("config")
        rows.append(
            {
                "index": point.index,
                "label": point.label,
                "values": point.values,
                "gpus": cfg.gpus,
                "feasible": plan.feasible,
                "reasons": plan.reasons,
                "step_time_s": plan.step_time_s,
                "tokens_per_s_per_gpu": plan.tokens_per_s_per_gpu,
                "mfu": plan.mfu,
                "peak_mem_gb": max(plan.peak_mem_gb.values(), default=0.0),
                "train_peak_gb": plan.peak_mem_gb.get("train", plan.peak_mem_gb.get("all", 0.0)),
                "measured_by": None if reason else "array",
                "planned_only": reason,
                "plan": planned,
                "measured": None,
            }
        )
    return rows


def collect(study_dir: Path, rows: list[Row]) -> list[Row]:
    """Attach each point's measured.json (written by its array task) to its row."""
    for row in rows:
        file = study_dir / "points" / f"{row['index']:04d}" / "measured.json"
        if file.exists():
            row["measured"] = json.loads(file.read_text())
    return rows


def _f(value: float | None, fmt: str = "{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def _measured(row: Row, key: str) -> float | None:
    m = row.get("measured") or {}
    return m.get(key) if m.get("ok") else None


STUDY_HEADER = [
    "#",
    "point",
    "feasible",
    "plan step s",
    "plan tok/s/GPU",
    "plan MFU",
    "plan peak GB",
    "meas. step s",
    "meas. / plan",
    "meas. RSS GB",
    "note",
]


def study_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        step = _measured(r, "time_step_s")
        ratio = step / r["step_time_s"] if step and r["step_time_s"] else None
        m = r.get("measured") or {}
        note = r["reasons"][0] if r["reasons"] else (r["planned_only"] or "")
        if m and not m.get("ok"):
            note = f"measurement failed: {m.get('error', '?')}"
        out.append(
            [
                str(r["index"]),
                r["label"],
                "yes" if r["feasible"] else "no",
                _f(r["step_time_s"] or None),
                _f(r["tokens_per_s_per_gpu"] or None),
                _f(r["mfu"] or None, "{:.1%}"),
                _f(r["peak_mem_gb"] or None, "{:.1f}"),
                _f(step),
                _f(ratio, "{:.1f}×"),
                _f(_measured(r, "max_rss_gb"), "{:.2f}"),
                note[:90],
            ]
        )
    return out


def study_table(rows: list[Row]) -> str:
    return table(STUDY_HEADER, study_rows(rows))


def best_lines(rows: list[Row]) -> list[str]:
    """The feasible point with the most tokens/s/GPU per GPU count, as markdown bullets."""
    best: dict[int, Row] = {}
    for r in rows:
        if r["feasible"] and (
            r["gpus"] not in best
            or r["tokens_per_s_per_gpu"] > best[r["gpus"]]["tokens_per_s_per_gpu"]
        ):
            best[r["gpus"]] = r
    return [
        f"- best planned on {g} GPUs: #{r['index']} ({r['label']}): {r['step_time_s']:.3g} s/step, "
        f"{r['tokens_per_s_per_gpu']:.3g} tokens/s/GPU, MFU {r['mfu']:.1%}, peak {r['peak_mem_gb']:.1f} GB"
        for g, r in sorted(best.items())
    ]


def study_markdown(
    name: str, rows: list[Row], study_dir: Path, plots: list[str] | None = None
) -> str:
    feasible = sum(r["feasible"] for r in rows)
    measured = sum(bool(_measured(r, "time_step_s")) for r in rows)
    parts = [
        f"# Study {name}",
        "",
        f"{len(rows)} grid points: {feasible} feasible, {len(rows) - feasible} pruned, "
        f"{measured} measured. Planned figures: docs/planner.md. Measured step time is the median "
        "of `time_step_s` over the steps after the first (warm-up); memory is the peak RSS of "
        "the largest process of the run (CPU points).",
        "",
        *best_lines(rows),
        "",
        _md_table(STUDY_HEADER, study_rows(rows)),
        "",
    ]
    for plot in plots or []:
        parts += [f"![{plot}]({plot})", ""]
    return "\n".join(parts)


def plot(rows: list[Row], study_dir: Path) -> list[str]:
    """Write the PNGs; return their file names (relative to study_dir)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pairs = [(r["step_time_s"], _measured(r, "time_step_s"), r["label"]) for r in rows]
    pairs = [p for p in pairs if p[1]]
    if pairs:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        ax.scatter(xs, ys)
        for x, y, label in pairs:
            ax.annotate(label, (x, y), fontsize=6)
        lo, hi = min(xs + ys) / 2, max(xs + ys) * 2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = planned")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="planned step time (s)",
            ylabel="measured step time (s)",
            title="Step time: measured vs planned",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(study_dir / "step_time.png", dpi=120)
        plt.close(fig)
        written.append("step_time.png")
    mem = [(r["train_peak_gb"], _measured(r, "max_rss_gb"), r["label"]) for r in rows]
    mem = [m for m in mem if m[1]]
    if mem:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        ax.scatter([m[0] for m in mem], [m[1] for m in mem])
        for x, y, label in mem:
            ax.annotate(label, (x, y), fontsize=6)
        ax.set(
            xlabel="planned peak per trainer rank (GB)",
            ylabel="measured peak RSS (GB)",
            title="Memory: measured vs planned",
        )
        fig.tight_layout()
        fig.savefig(study_dir / "memory.png", dpi=120)
        plt.close(fig)
        written.append("memory.png")
    feasible = [r for r in rows if r["feasible"]]
    if feasible:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        by_gpus: dict[int, float] = {}
        for r in feasible:
            by_gpus[r["gpus"]] = max(by_gpus.get(r["gpus"], 0.0), r["tokens_per_s_per_gpu"])
        g = sorted(by_gpus)
        ax.plot(g, [by_gpus[x] for x in g], "o-", label="planned (best point per GPU count)")
        meas = [(r["gpus"], _measured(r, "tokens_per_s_per_gpu")) for r in rows]
        meas = [m for m in meas if m[1]]
        if meas:
            ax.scatter(
                [m[0] for m in meas], [m[1] for m in meas], marker="x", color="C3", label="measured"
            )
        # linear from 0: flat = perfect weak scaling; the x axis is log2 over GPU counts
        ax.set(xscale="log", xlabel="GPUs (ranks)", ylabel="tokens/s per GPU", title="Scaling")
        ax.set_ylim(bottom=0)
        ax.set_xticks(g, [str(x) for x in g])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(study_dir / "scaling.png", dpi=120)
        plt.close(fig)
        written.append("scaling.png")
    return written


def write_report(study_dir: Path) -> Path:
    """Merge measured results into STUDY_DIR/plan.json's rows; write report.md and PNGs."""
    data = json.loads((study_dir / "plan.json").read_text())
    rows = collect(study_dir, data["points"])
    (study_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plots = plot(rows, study_dir)
    out = study_dir / "report.md"
    out.write_text(study_markdown(data["study"], rows, study_dir, plots))
    return out
