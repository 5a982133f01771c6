"""Shared pytest fixtures (keep small: one fixture, one job)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def weird_tmp_path(tmp_path: Path) -> Path:
    """A directory whose path has spaces, both quotes, `$(...)`, backticks and `;`.

    Anything that builds shell or sbatch text from a path must survive it. If a generated
    line ever executes part of the path, `touch PWNED` creates tmp_path/PWNED (tests that
    run the text with cwd=tmp_path assert it does not exist). Newlines are not in the
    path: they are refused outright (a #SBATCH header is read line by line).
    """
    path = tmp_path / "we ird" / "quo'te\"d $(touch PWNED) `touch PWNED`" / "semi;colon&amp"
    path.mkdir(parents=True)
    return path


def _slurm_first(item: pytest.Item) -> tuple[bool, bool]:
    return (item.get_closest_marker("slurm") is None,
            item.get_closest_marker("stops_slurmctld") is not None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Slurm tests first, in file order, the one that stops slurmctld last (they share
    the test cluster's two nodes and its controller)."""
    for item in items:
        if (item.get_closest_marker("slurm") is not None) != (
                _work_unit(item.nodeid) == "slurm"):
            raise pytest.UsageError(f"{item.nodeid}: tests marked `slurm` live in "
                                    f"{SLURM_FILES}*.py, and only they (make test runs them "
                                    "in order on one worker)")
    items.sort(key=_slurm_first)  # stable


SLURM_FILES = "tests/integration/test_slurm"  # test_slurm*.py there: every test marked slurm


def _work_unit(nodeid: str) -> str:
    """Every test file is a unit of its own (its module fixtures are built once), but the
    Slurm files are one unit: their tests run in order on one worker."""
    path = nodeid.split("::", 1)[0]
    return "slurm" if path.startswith(SLURM_FILES) else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`make test`'s two workers (tools/run-tests): work units as `_work_unit` says.

    NOTE: xdist's own `--dist loadgroup` tags node ids in a way pytest 9 no longer reads
    (seen: tests of one group on both workers), so the units are made here, from node ids.
    """
    from xdist.scheduler import LoadScopeScheduling

    class SlurmAsOneUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return SlurmAsOneUnit(config, log)
