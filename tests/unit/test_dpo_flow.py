"""Offline DPO (`algorithm: dpo`) end to end on a char model and reversal pairs: held-out
preference accuracy rises, the reference runs once (stored log-probs reused by a resume),
and a killed run resumes bitwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train_rm import _pairs

from hpcalign.cli import main as cli_main
from hpcalign.config.schema import ModelInit
from hpcalign.models.tiny import init_model


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("dpo") / "policy")
    init_model(path, ModelInit(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    _pairs(root / "train.jsonl", 600, seed=0)
    _pairs(root / "eval.jsonl", 100, seed=1)
    return root / "train.jsonl", root / "eval.jsonl"


def _argv(policy, pairs, run_dir, *extra):
    train, held_out = pairs
    return ["run", "configs/dpo-tiny.yaml", f"models.policy.path={policy}",
            f"data.train={train}", f"data.eval={held_out}", f"run_dir={run_dir}", *extra]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_dpo_learns_the_held_out_preference(policy, pairs, tmp_path):
    run_dir = tmp_path / "run"
    assert cli_main(_argv(policy, pairs, run_dir, "trainer.steps=150",
                          "trainer.eval_every_steps=1000")) == 0
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(150))
    assert rows[0]["preference_accuracy"] == 0.0  # policy == reference: every margin 0
    assert rows[-1]["eval_preference_accuracy"] >= 0.9, rows[-1]
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    assert all(r["reference_forwards"] == rows[0]["reference_forwards"] > 0 for r in rows)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "model")  # an HF checkpoint


def test_killed_dpo_resumes_bitwise_reusing_the_stored_reference(policy, pairs, tmp_path):
    steps = ["trainer.steps=8", "checkpoint.every_steps=3", "trainer.eval_every_steps=4"]
    whole = tmp_path / "whole"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what an earlier test may leave: the run must set its own count
    try:
        assert cli_main(_argv(policy, pairs, whole, *steps)) == 0
    finally:
        torch.set_num_threads(before)
    killed = tmp_path / "killed"
    argv = [sys.executable, "-m", "hpcalign.cli", *_argv(policy, pairs, killed, *steps)]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HPCALIGN_FAULTS": "after-checkpoint@6"})
    assert first.returncode == -9, first.stderr[-2000:]
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HPCALIGN_FAULTS": "after-checkpoint@6"})
    assert second.returncode == 0, second.stderr[-2000:]
    assert "reference forwards this run: 0" in second.stdout  # read back, not recomputed
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k not in ("time_s", "reference_forwards")}
             for r in _metrics(whole)]
    assert strip == [{k: v for k, v in r.items() if k not in ("time_s", "reference_forwards")}
                     for r in _metrics(killed)]


def test_stored_reference_of_other_data_is_refused(policy, pairs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli_main(_argv(policy, pairs, run_dir, "trainer.steps=1")) == 0
    other = tmp_path / "other.jsonl"
    other.write_text(open(pairs[0]).read().splitlines()[0] + "\n")
    capsys.readouterr()
    assert cli_main(["run", "configs/dpo-tiny.yaml", f"models.policy.path={policy}",
                     f"data.train={other}", f"run_dir={run_dir}", "trainer.steps=2"]) == 2
    assert "reference log-probs of other data" in capsys.readouterr().err


def test_dpo_config_errors_name_the_key(policy, pairs, tmp_path, capsys):
    assert cli_main(_argv(policy, pairs, tmp_path / "r", "dpo.loss_type=hinge",
                          "dpo.label_smoothing=0.1")) == 2
    err = capsys.readouterr().err
    assert "dpo.label_smoothing=0.1" in err and "Traceback" not in err
