"""The weight sync over NCCL on GPUs: the same WeightBroadcaster and script as the gloo test.

Skipped without a GPU; run through the device tool when a session is lent one.
"""

import os
import sys

import pytest
import torch

from hpcalign.launch.local import run_mpiexec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "integration", "mpi_scripts")


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="NCCL needs one GPU per rank (it refuses two ranks on one GPU)")
def test_weight_sync_over_nccl_is_bitwise(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    argv = [exe, "--oversubscribe", "--bind-to", "none", *root, "-n", "2",
            sys.executable, os.path.join(SCRIPTS, "weight_sync.py"), str(tmp_path), "nccl"]
    result = run_mpiexec(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "weight_sync ranks ok: [True, True]" in result.stdout
