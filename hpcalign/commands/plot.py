"""`hpcalign plot RUN_DIR [--out DIR] [--keys k1,k2]`: training curves as PNG files.

Reads `RUN_DIR/metrics.jsonl` (see `hpcalign.metrics`) and writes one PNG per curve to
`RUN_DIR/plots/` (or `--out`): reward (mean with a ±std band), loss, KL, entropy, response
length, samples/s and the phase times (`time_*` keys, one line each). `--keys` plots the
named keys instead, one file each. Works on a running job: it only reads the file.

    hpcalign plot runs/grpo-countdown && ls runs/grpo-countdown/plots
"""

from __future__ import annotations

import argparse
import math
import os
import re

from hpcalign.errors import UserError
from hpcalign.metrics import METRICS_FILE, read_metrics

HELP = "plot training curves (reward, loss, KL, lengths, throughput, phase times) to PNG"

# file stem -> (title, key pattern); every key matching the pattern is one line
FIGURES: dict[str, tuple[str, str]] = {
    "reward": ("reward (mean ± std)", r"reward_mean"),
    "loss": ("loss", r"loss"),
    "kl": ("KL to reference (k3)", r"kl"),
    "entropy": ("entropy (nats/token)", r"entropy"),
    "response_length": ("response length (tokens)", r"(response|completion)_len\w*"),
    "samples_per_s": ("throughput (samples/s)", r"samples_per_s"),
    "phase_times": ("phase times (s)", r"time_\w+"),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign plot", description=HELP)
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--out", metavar="DIR", help="where to write PNGs (default RUN_DIR/plots)")
    parser.add_argument("--keys", help="comma-separated metric keys to plot, one PNG each")
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir, args.out, args.keys.split(",") if args.keys else None):
        print(path)
    return 0


def plot_run(run_dir: str, out_dir: str | None = None, keys: list[str] | None = None) -> list[str]:
    """Write the PNGs and return their paths."""
    records = read_metrics(run_dir)
    if not records:
        where = os.path.join(run_dir, METRICS_FILE)
        raise UserError(f"no metrics in {where} (not a run directory, or no step finished yet)")
    available = sorted({k for r in records for k in r} - {"step"})
    if keys:
        unknown = [k for k in keys if k not in available]
        if unknown:
            raise UserError(
                f"no metric named {', '.join(unknown)}; available: {', '.join(available)}"
            )
        figures = {re.sub(r"\W", "_", k): (k, [k]) for k in keys}
    else:
        figures = {}
        for stem, (title, pattern) in FIGURES.items():
            matching = [k for k in available if re.fullmatch(pattern, k)]
            if matching:
                figures[stem] = (title, matching)
        if not figures:
            raise UserError(
                f"none of the standard metrics in {run_dir}; pick some with --keys from: "
                + ", ".join(available)
            )
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in records]
    paths = []
    for stem, (title, figure_keys) in figures.items():
        series = {k: [_number(r.get(k)) for r in records] for k in figure_keys}
        std = [_number(r.get("reward_std")) for r in records] if stem == "reward" else None
        path = os.path.join(out_dir, f"{stem}.png")
        _save_figure(path, title, steps, series, std)
        paths.append(path)
    return paths


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _save_figure(
    path: str,
    title: str,
    steps: list[int],
    series: dict[str, list[float]],
    std: list[float] | None,
) -> None:
    # NOTE: the object API with the Agg canvas, not pyplot: no display, no global state,
    # and no figure leaks when called in a loop.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, values in series.items():
        ax.plot(steps, values, label=key, linewidth=1.2, marker="." if len(steps) < 50 else None)
        if std is not None:
            low = [m - s for m, s in zip(values, std)]
            high = [m + s for m, s in zip(values, std)]
            ax.fill_between(steps, low, high, alpha=0.25, label="± reward_std")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or std is not None:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
