"""A whole local GRPO run on GPUs: the same roles, device placement and weight sync.

Skipped without a GPU; run through the device tool when a session is lent one. With two or
more GPUs the world uses NCCL (rank 0's `auto` choice); with one, trainer and generator
share it and the sync goes over gloo (NCCL refuses two ranks on one GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from local_runs import QUICKSTART, TINY, metrics  # noqa: E402


def test_grpo_runs_on_gpus(tmp_path: Path) -> None:
    run_dir = tmp_path / "gpu"
    extra = [] if torch.cuda.device_count() >= 2 else ["comm.dist_backend=gloo"]
    argv = [sys.executable, "-m", "hpcalign.cli", "run", QUICKSTART, f"run_dir={run_dir}", *TINY,
            "trainer.steps=6", "trainer.device=cuda", "generator.device=cuda", *extra]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "state.json").read_text())["state"] == "done"
    rendezvous = json.loads((run_dir / "rendezvous.json").read_text())
    assert rendezvous["backend"] == ("nccl" if not extra else "gloo")
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert "ready on" in log and "(cuda:" in log, log
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(6))
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN
