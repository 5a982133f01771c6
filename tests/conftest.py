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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Work units for `make test`'s two workers (pytest-xdist, `--dist loadgroup`).

    The tests marked `slurm` form one unit run first, in file order (the one that stops
    slurmctld last): they share the two nodes of the test cluster, and they wait on it, so the
    other worker runs the rest meanwhile. Every other test file is a unit of its own, so a
    module-scoped fixture (a reference run) is built once. Without xdist this only moves
    the Slurm tests to the front.
    """
    items.sort(key=lambda item: (item.get_closest_marker("slurm") is None,  # stable
                                 item.get_closest_marker("stops_slurmctld") is not None))
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
