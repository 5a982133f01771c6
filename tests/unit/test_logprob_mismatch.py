"""logprob_mismatch_mean / _max in the update, and trainer.max_logprob_mismatch's named error.

The generator's log-probs are the trainer's own plus known offsets, so the metrics must be
exactly those offsets' token mean and max (an independent computation), through
micro-batches whose sum-of-means adds up and whose max must not.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hpcalign.config.load import load_config
from hpcalign.config.schema import ModelInit, TrainerConfig
from hpcalign.engines import OptimizerSpec, build_training_engine
from hpcalign.models.tiny import init_model
from hpcalign.roles.update import (
    LogprobMismatchError,
    logprob_mismatch_check,
    prepare_update,
    run_update,
)

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml")


def test_mismatch_metrics_are_the_offsets_mean_and_max(tmp_path):
    path = str(tmp_path / "char")
    init_model(path, ModelInit(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64))
    cfg = load_config(QUICKSTART, [f"model.path={path}", "run_dir=/tmp/unused"])
    cpu = torch.device("cpu")
    policy = build_training_engine("torch", path, cfg, device=cpu,
                                   optimizer=OptimizerSpec(lr=1e-3))
    reference = build_training_engine("torch", path, cfg, device=cpu)
    rng = np.random.default_rng(0)
    prompts = [np.array([1, *rng.integers(4, 30, size=rng.integers(2, 6))]) for _ in range(6)]
    completions = [rng.integers(4, 30, size=rng.integers(1, 7)) for _ in range(6)]
    exact = policy.logprobs(policy.pack(prompts, completions), temperature=1.0)[0]
    offsets = [rng.uniform(0, 0.01, size=len(c)).astype(np.float32) for c in completions]
    offsets[4][0] = 0.5  # the worst token, in the second micro-batch
    old = [exact[i, len(p):len(p) + len(c)].numpy() - offsets[i]
           for i, (p, c) in enumerate(zip(prompts, completions))]
    tcfg = TrainerConfig(micro_batch=3)
    tokens = float(sum(len(c) for c in completions))
    prepared = prepare_update(policy, reference, prompts, completions, old, tcfg,
                              temperature=1.0)
    result = run_update(policy, prepared, torch.zeros(6), tokens, tcfg, temperature=1.0)
    flat = np.concatenate(offsets)
    assert result.metrics["logprob_mismatch_mean"] == pytest.approx(flat.mean(), abs=2e-6)
    assert result.metrics["logprob_mismatch_max"] == pytest.approx(0.5, abs=2e-6)

    logprob_mismatch_check(dict(result.metrics), None, 3)  # off
    logprob_mismatch_check(dict(result.metrics), 0.0, 3)  # 0 is off too
    logprob_mismatch_check(dict(result.metrics), 0.6, 3)
    with pytest.raises(LogprobMismatchError, match=r"step 3: .*0\.5.*max_logprob_mismatch=0\.1"):
        logprob_mismatch_check(dict(result.metrics), 0.1, 3)


def test_the_threshold_is_validated():
    assert TrainerConfig().max_logprob_mismatch is None
    with pytest.raises(ValueError, match="max_logprob_mismatch"):
        TrainerConfig(max_logprob_mismatch=-1)
