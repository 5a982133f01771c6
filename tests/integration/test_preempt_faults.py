"""Samples of the fault tools (tools/faults/preempt.py, tools/faults/slurm_faults.py).

The figures come from the tools with their defaults (docs/benchmarks.md); here: a kill -9 of
a trainer rank and of a generator rank of a real 2+2 local run, each resumed bitwise. The
Slurm sample (slurmctld stopped) is tests/integration/test_slurm_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from local_runs import ROOT

TOOLS = os.path.join(ROOT, "tools", "faults")


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
    # a model on ranks of its own (plan.json's models) is named as that model
    (tmp_path / "plan.json").write_text(json.dumps({
        "trainer": {"ranks": 1}, "generator": {"first_rank": 1, "ranks": 1},
        "models": {"reference": {"role": "reference", "first_rank": 2, "ranks": 1}}}))
    assert explain_failure(str(tmp_path), tail, 137) == (
        "reference 0 (world rank 2) died: exited on signal 9 (Killed).")


def test_kill9_of_a_trainer_and_a_generator_rank_resumes_bitwise():
    # seed 3: generator 0 at step 8 and trainer 1 at step 4 of a 2+2 run, one kill each
    result = tool(os.path.join(TOOLS, "preempt.py"), "2", "--layouts", "2x2", "--seed", "3",
                  timeout=400)
    assert {row["role"] for row in result["rows"]} == {"trainer", "generator"}, result
    assert result["bitwise"] == result["named"] == result["failed_fast"] == 2, result
    assert result["tracebacks"] == result["leftover_ranks"] == 0, result
    assert result["max_verdict_s"] < result["verdict_bound_s"], result
