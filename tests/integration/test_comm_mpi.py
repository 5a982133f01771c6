"""The control and data planes under a real `mpiexec` (Open MPI wheel), 2–3 ranks."""

import os
import subprocess
import sys

import pytest

from hpcalign.launch.local import run_mpiexec

SCRIPTS = os.path.join(os.path.dirname(__file__), "mpi_scripts")


def mpiexec(n: int, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    argv = [exe, "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    argv += ["-n", str(n), sys.executable, os.path.join(SCRIPTS, script), *args]
    return run_mpiexec(argv, capture_output=True, text=True, timeout=timeout)


def test_weight_sync_in_buckets_is_bitwise_and_gradients_sum(tmp_path):
    result = mpiexec(3, "weight_sync.py", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "weight_sync ranks ok: [True, True, True]" in result.stdout


def test_silent_peer_times_out_naming_the_rank():
    result = mpiexec(2, "silent_peer.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TIMEOUT" in result.stdout
    assert "generator 0 (world rank 1)" in result.stdout
    assert "sent nothing" in result.stdout


@pytest.mark.parametrize("n", [2])
def test_mpmd_world_spans_two_programs(n, tmp_path):
    """`mpiexec A : B` gives one world across two programs (the local launcher's shape)."""
    script = tmp_path / "who.py"
    script.write_text("import sys\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
                      "print(sys.argv[1], c.Get_rank(), c.Get_size(), flush=True)\n")
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    argv = [exe, "--oversubscribe", *root, "-n", "1", sys.executable, str(script), "trainer",
            ":", "-n", str(n), sys.executable, str(script), "generator"]
    out = run_mpiexec(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.split("\n")[:-1])
    assert lines == ["generator 1 3", "generator 2 3", "trainer 0 3"]
