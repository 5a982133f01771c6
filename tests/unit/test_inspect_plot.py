"""`hpcalign inspect` and `hpcalign plot` through the real CLI entry point."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from hpcalign.cli import main
from hpcalign.data.shards import Ragged, RolloutBatch, shard_path, write_shard
from hpcalign.metrics import MetricsWriter


def write_batch(run_dir: str, rank: int) -> str:
    rng = np.random.default_rng(rank)
    lengths = rng.integers(1, 20, 8)
    batch = RolloutBatch(
        step=7,
        policy_version=6,
        generator_rank=rank,
        prompt_ids=np.arange(8, dtype=np.int64) // 4,
        prompt_tokens=Ragged.from_list([[1, 2, 3]] * 8, np.int32),
        completion_tokens=Ragged.from_list([rng.integers(0, 500, k) for k in lengths], np.int32),
        logprobs=Ragged.from_list([-rng.random(k) for k in lengths], np.float32),
        rewards=np.linspace(0, 1, 8, dtype=np.float32),
        seeds=np.arange(8, dtype=np.int64),
        finished=np.ones(8, bool),
        attrs={"task": "countdown"},
    )
    return write_shard(shard_path(run_dir, 7, rank), batch).path


def test_inspect_good_shards(tmp_path, capsys):
    paths = [write_batch(str(tmp_path), rank) for rank in range(2)]
    assert main(["inspect", *paths]) == 0
    out = capsys.readouterr().out
    assert "step 7  policy_version 6  generator_rank 1" in out
    assert "reward      mean 0.5" in out and "min 0  p50 0.5  max 1" in out
    assert "prompt 24" in out and "2 of 2 shards OK" in out


def test_inspect_bad_shard_exits_1_without_traceback(tmp_path, capsys):
    good = write_batch(str(tmp_path), 0)
    bad = write_batch(str(tmp_path), 1)
    with h5py.File(bad, "r+", locking=False) as f:
        del f["rewards"]
    foreign = str(tmp_path / "copied.h5")  # the same bad bytes, without the writer's sidecar
    shutil.copyfile(bad, foreign)
    missing = str(tmp_path / "nope.h5")
    assert main(["inspect", good, bad, foreign, missing]) == 1
    captured = capsys.readouterr()
    assert f"BAD {bad}: file checksum " in captured.err and "not parsed" in captured.err
    assert f"BAD {foreign}: dataset 'rewards' is missing" in captured.err  # bounded child
    assert f"BAD {missing}: no such file" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "verified by its sidecar shard-0000.json" in captured.out
    assert "1 of 4 shards OK" in captured.out


def test_inspect_bounds_the_parse_of_a_file_without_sidecar(tmp_path, capsys):
    good = write_batch(str(tmp_path), 0)
    os.unlink(os.path.splitext(good)[0] + ".json")
    assert main(["inspect", "--parse-timeout-s", "20", good]) == 0
    assert "no sidecar: parsed first in a child process bounded to 20 s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--parse-timeout-s", "0", good])
    assert exit_info.value.code == 2


def test_inspect_needs_a_shard(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect"])
    assert exit_info.value.code == 2


def write_run(run_dir, steps=12):
    with MetricsWriter(str(run_dir), tensorboard=False) as writer:
        for step in range(steps):
            writer.write(
                step,
                {
                    "reward_mean": step / steps,
                    "reward_std": 0.1,
                    "loss": 1 / (step + 1),
                    "kl": 0.01 * step,
                    "entropy": 2.0,
                    "response_len_mean": 30 + step,
                    "samples_per_s": 100.0,
                    "time_generate_s": 1.0,
                    "time_train_s": 0.5,
                    "grad_norm": float("nan") if step == 3 else 1.0,
                },
            )


def is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return os.path.getsize(path) > 1000 and f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_default_figures(tmp_path, capsys):
    write_run(tmp_path)
    assert main(["plot", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(os.path.basename(p) for p in printed)
    assert names == sorted(
        f"{n}.png"
        for n in (
            "reward",
            "loss",
            "kl",
            "entropy",
            "response_length",
            "samples_per_s",
            "phase_times",
        )
    )
    assert all(p.startswith(str(tmp_path / "plots")) and is_png(p) for p in printed)


def test_plot_keys_and_out(tmp_path, capsys):
    write_run(tmp_path)
    out = tmp_path / "elsewhere"
    assert main(["plot", str(tmp_path), "--out", str(out), "--keys", "grad_norm,kl"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "grad_norm.png"), str(out / "kl.png")]
    assert all(is_png(p) for p in printed)


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2  # UserError: printed as one line, exit 2
    assert "no metrics in" in capsys.readouterr().err
    write_run(tmp_path, steps=2)
    assert main(["plot", str(tmp_path), "--keys", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no metric named nope; available:" in err and "reward_mean" in err
