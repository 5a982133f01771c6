"""Samples of the fault tools (tools/faults/preempt.py, tools/faults/slurm_faults.py).

The figures come from the tools with their defaults (docs/benchmarks.md); here: a kill -9 of
a trainer rank and of a generator rank of a real 2+2 local run, each resumed bitwise, and
slurmctld stopped during `hpcalign submit` and `hpcalign status` (a named line within the
bound, then the controller is back and the cluster healthy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from local_runs import ROOT
from slurm_cluster import SLURM_ONLY

TOOLS = os.path.join(ROOT, "tools", "faults")
CLUSTER = os.path.join(ROOT, "tools", "slurm-test-cluster")


def tool(*argv: str, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mpiexec_report_of_a_killed_rank_is_one_short_line(tmp_path):
    """The launcher names the rank mpiexec saw die (not the first "rank N" in the tail, a
    peer's secondary error), and its line ends with the reason, not mpiexec's ruler."""
    from hpcalign.launch.local import explain_failure

    (tmp_path / "plan.json").write_text(json.dumps({"trainer": {"ranks": 2}}))
    tail = ("hpcalign: trainer 0 (world rank 0) on x failed: RuntimeError: weight sync to "
            "generator 0 (world rank 2) failed: Connection closed by peer\n" + "-" * 74 +
            "\nprterun noticed that process rank 2 with PID 99 on node x exited on\nsignal 9 "
            "(Killed).\n" + "-" * 74 + "\nmore text\n")
    assert explain_failure(str(tmp_path), tail, 137) == (
        "generator 0 (world rank 2) died: exited on signal 9 (Killed).")


def test_kill9_of_a_trainer_and_a_generator_rank_resumes_bitwise():
    # seed 3: generator 0 at step 8 and trainer 1 at step 4 of a 2+2 run, one kill each
    result = tool(os.path.join(TOOLS, "preempt.py"), "2", "--layouts", "2x2", "--seed", "3",
                  timeout=400)
    assert {row["role"] for row in result["rows"]} == {"trainer", "generator"}, result
    assert result["bitwise"] == result["named"] == result["failed_fast"] == 2, result
    assert result["tracebacks"] == result["leftover_ranks"] == 0, result
    assert result["max_verdict_s"] < result["verdict_bound_s"], result


@SLURM_ONLY[0]  # marked `slurm`, skipped when no controller answers (like the other Slurm tests)
@SLURM_ONLY[1]
@pytest.mark.stops_slurmctld
def test_slurmctld_stopped_during_submit_and_status_is_a_named_line_in_bounds():
    try:
        result = tool(os.path.join(TOOLS, "slurm_faults.py"), "--only", "ctld", timeout=600)
    finally:  # the shared test cluster gets its controller back whatever happened
        subprocess.run([CLUSTER, "up"], capture_output=True, timeout=180)
    rows = {row["fault"]: row for row in result["rows"]}
    submit, status = rows["ctld_submit"], rows["ctld_status"]
    assert submit["ok"], submit
    assert "slurm" in submit["error"].lower() or "sbatch" in submit["error"], submit
    assert status["ok"], status
    assert status["within_bound"] and not status["traceback"], status
