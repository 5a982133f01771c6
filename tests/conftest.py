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
