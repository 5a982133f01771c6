"""MetricsWriter: JSONL lines, resume semantics after a kill, torn lines, TensorBoard."""

from __future__ import annotations

import json
import math
import os

import pytest

from hpcalign.errors import UserError
from hpcalign.metrics import MetricsWriter, read_metrics


def write_steps(run_dir, steps, tensorboard=False, scale=1.0):
    writer = MetricsWriter(str(run_dir), tensorboard=tensorboard)
    for step in steps:
        writer.write(step, {"loss": scale * step, "reward_mean": step / 100})
    return writer


def test_one_line_per_step_step_first_flushed(tmp_path):
    writer = write_steps(tmp_path, range(3))
    # flushed without close: what `tail -f` or a killed job sees
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    assert lines[1].startswith('{"step": 1,')
    writer.close()
    assert read_metrics(str(tmp_path))[2] == {"step": 2, "loss": 2.0, "reward_mean": 0.02}


def test_resume_drops_redone_steps(tmp_path):
    write_steps(tmp_path, range(46)).close()  # killed after step 45...
    write_steps(tmp_path, range(40, 50), scale=2.0).close()  # ...resumed from step 40
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(50))
    assert records[39]["loss"] == 39.0 and records[40]["loss"] == 80.0  # new values


def test_resume_later_keeps_everything(tmp_path):
    write_steps(tmp_path, range(5)).close()
    write_steps(tmp_path, [7]).close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4, 7]


def test_opening_alone_changes_nothing(tmp_path):
    write_steps(tmp_path, range(5)).close()
    MetricsWriter(str(tmp_path), tensorboard=False).close()
    assert len(read_metrics(str(tmp_path))) == 5


def test_torn_last_line(tmp_path):
    write_steps(tmp_path, range(3)).close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed mid-write
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2]
    write_steps(tmp_path, [3]).close()  # the resumed writer drops the torn line
    text = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in text.splitlines()] == [0, 1, 2, 3]


def test_bad_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2"):
        read_metrics(str(tmp_path))


def test_no_metrics_file(tmp_path):
    assert read_metrics(str(tmp_path / "missing")) == []


def test_non_finite_values_are_null_in_the_file(tmp_path):
    with MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write(0, {"loss": float("nan"), "kl": float("inf"), "entropy": 1})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 0, "loss": None, "kl": None, "entropy": 1.0}
    record = read_metrics(str(tmp_path))[0]
    assert math.isnan(record["loss"]) and math.isnan(record["kl"])


def test_steps_must_increase(tmp_path):
    writer = write_steps(tmp_path, [3])
    with pytest.raises(ValueError, match="write each step once"):
        writer.write(3, {"loss": 0.0})
    with pytest.raises(ValueError, match="'step'"):
        writer.write(4, {"step": 1.0})
    writer.close()


def test_tensorboard_scalars_with_purge(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_steps(tmp_path, range(6), tensorboard=True).close()
    write_steps(tmp_path, range(3, 5), tensorboard=True, scale=2.0).close()
    events = EventAccumulator(os.path.join(tmp_path, "tb"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("loss")}
    assert loss == {0: 0.0, 1: 1.0, 2: 2.0, 3: 6.0, 4: 8.0}  # steps 3..5 of the first run purged
