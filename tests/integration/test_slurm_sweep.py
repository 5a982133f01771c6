"""A tiny scaling sweep on the real test Slurm cluster: plan, job array, measured report.

`hpcalign sweep configs/study-tiny.yaml` (reduced grid) plans 4 points, prunes one, keeps
one planned only (TP 2), and submits the 2 measurable ones as a submitit job array on the
`train` partition; each task runs a 3-step `hpcalign run` and writes measured.json. The
report must hold measured and planned values side by side, and the plots.
Needs `tools/slurm-test-cluster up`; skipped when no controller answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from slurm_cluster import SLURM_ONLY

ROOT = Path(__file__).resolve().parents[2]


pytestmark = SLURM_ONLY


def test_tiny_sweep_measures_on_slurm(tmp_path: Path) -> None:
    out = tmp_path / "study"
    argv = [
        sys.executable,
        "-m",
        "hpcalign.cli",
        "sweep",
        str(ROOT / "configs/study-tiny.yaml"),
        "grid.staleness=[1]",
        "measure.steps=3",
        "measure.executor=slurm",
        "measure.wait_s=600",
        "--out",
        str(out),
    ]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 of 2 tasks measured" in proc.stdout, proc.stdout[-2000:]

    rows = {r["index"]: r for r in json.loads((out / "results.json").read_text())}
    assert len(rows) == 4
    pruned = [r for r in rows.values() if not r["feasible"]]
    assert len(pruned) == 1 and "does not divide" in pruned[0]["reasons"][0]
    measured = [r for r in rows.values() if r["measured"]]
    assert len(measured) == 2
    for r in measured:
        m = r["measured"]
        assert m["ok"], m
        assert (
            m["slurm_job_id"] and m["slurm_array_task_id"] is not None and m["partition"] == "train"
        )
        assert m["time_step_s"] > 0 and m["samples_per_s"] > 0 and m["steps_timed"] == 2
        assert m["max_rss_gb"] > 0.05  # a torch process really ran
        assert r["step_time_s"] > 0  # planned next to it
    # the array really went through Slurm's accounting as one job with two tasks
    job_ids = json.loads((out / "jobs.json").read_text())["job_ids"]
    assert len({j.split("_")[0] for j in job_ids}) == 1 and len(job_ids) == 2
    report = (out / "report.md").read_text()
    assert "2 measured" in report and "×" in report
    for png in ("step_time.png", "memory.png", "scaling.png"):
        assert (out / png).stat().st_size > 1000
