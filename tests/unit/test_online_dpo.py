"""OnlineDPO's pieces: (best, worst) pairs per group against a plain loop, and one update
through the training engine against the DPO formula computed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_engines import TINY, _cfg, _samples

from hpcalign.engines import OptimizerSpec, build_training_engine
from hpcalign.models.tiny import init_model
from hpcalign.roles.online_dpo import online_dpo_update, preference_pairs


def _pairs_by_loop(rewards: list[float], groups: list[int]) -> list[tuple[int, int]]:
    out, order = [], []
    for g in groups:
        if g not in order:
            order.append(g)
    for g in order:
        idx = [i for i, x in enumerate(groups) if x == g and not math.isnan(rewards[i])]
        if len(idx) < 2:
            continue
        best = idx[0]
        worst = idx[0]
        for i in idx[1:]:
            if rewards[i] > rewards[best]:
                best = i
            if rewards[i] < rewards[worst]:
                worst = i
        if rewards[best] != rewards[worst]:
            out.append((best, worst))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_preference_pairs_match_a_loop(seed):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(6), 4)
    rewards = rng.integers(0, 3, size=len(groups)).astype(np.float32)
    rewards[rng.random(len(groups)) < 0.15] = np.nan
    rewards[groups == 5] = 1.0  # no preference: dropped
    expected = _pairs_by_loop(rewards.tolist(), groups.tolist())
    assert preference_pairs(torch.from_numpy(rewards), torch.from_numpy(groups)) == expected
    assert all(rewards[c] > rewards[r] for c, r in expected)


def test_one_update_is_the_dpo_step_and_raises_the_margin(tmp_path):
    path = str(tmp_path / "m")
    init_model(path, TINY)
    cfg = _cfg(path)
    policy = build_training_engine("torch", path, cfg, device=torch.device("cpu"),
                                   optimizer=OptimizerSpec(lr=1e-2))
    reference = build_training_engine("torch", path, cfg, device=torch.device("cpu"))
    prompts, completions, _ = _samples(8, seed=3)
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7)]
    margins = []
    for _ in range(5):
        result = online_dpo_update(policy, reference, prompts, completions, pairs, 4, beta=0.5,
                                   loss_type="sigmoid", label_smoothing=0.0, temperature=1.0)
        margins.append(result.metrics["reward_margin"])
        if len(margins) == 1:  # policy == reference: every log-ratio 0, loss log 2
            assert result.metrics["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
            assert result.metrics["pairs"] == 4.0
    assert margins[0] == pytest.approx(0.0, abs=1e-9)
    assert margins[-1] > margins[1] > 0
    # a rank without pairs takes a zero-gradient step (the data-parallel all-reduce needs it)
    result = online_dpo_update(policy, reference, prompts, completions, [], 4, beta=0.5,
                               loss_type="sigmoid", label_smoothing=0.0, temperature=1.0)
    assert result.metrics == {"pairs": 0.0}
