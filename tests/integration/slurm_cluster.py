"""Shared by the tests that need the test Slurm cluster (tools/slurm-test-cluster up)."""

from __future__ import annotations

import subprocess

import pytest


def controller_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# `pytestmark = SLURM_ONLY` in a test module: marked `slurm`, skipped with the reason when no
# controller answers.
SLURM_ONLY = [pytest.mark.slurm, pytest.mark.skipif(
    not controller_up(), reason="no Slurm controller answers `sinfo` (run: tools/slurm-test-cluster up)")]


def sh(*argv: str, timeout: float = 30) -> str:
    """Run a Slurm command; its stdout, or a failed assertion with its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout
