"""A sample of tools/faults/slurm_faults.py on the test cluster: slurmctld stopped during
`hpcalign submit` and `hpcalign status` (a named line within the bound, then the controller
is back and the cluster healthy). Run after the other Slurm tests (it stops the controller
they share: tests/conftest.py orders it last).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from local_runs import ROOT
from slurm_cluster import SLURM_ONLY
from test_preempt_faults import TOOLS, tool

CLUSTER = os.path.join(ROOT, "tools", "slurm-test-cluster")

pytestmark = SLURM_ONLY


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
