"""PPO's pieces: KL-shaped token rewards against a loop, the critic's value alignment, and
updates through real engines that move the policy toward high-scored completions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engines import TINY, _cfg, _samples

from hpcalign.algorithms.kl_control import kl_controller
from hpcalign.engines import OptimizerSpec, build_training_engine
from hpcalign.engines.torch_value import TorchValueEngine, position_values
from hpcalign.models.tiny import init_model
from hpcalign.roles.ppo import PPOSettings, ppo_update, sample_mean_kl, token_rewards


def test_token_rewards_match_a_loop():
    rng = np.random.default_rng(0)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    logp, ref = (torch.from_numpy(rng.normal(size=mask.shape)) for _ in range(2))
    scores = torch.tensor([1.0, -2.0, 3.0, 0.5])
    got = token_rewards(scores, logp, ref, mask, 0.1)
    want = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        cols = [t for t in range(mask.shape[1]) if mask[b, t]]
        for t in cols:
            want[b, t] = -0.1 * (logp[b, t] - ref[b, t])
        if cols:
            want[b, cols[-1]] += scores[b]
    torch.testing.assert_close(got, want)


def test_sample_mean_kl_matches_a_loop():
    rng = np.random.default_rng(1)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    logp, ref = (torch.from_numpy(rng.normal(size=mask.shape)) for _ in range(2))
    per_sample = []
    for b in range(mask.shape[0]):
        cols = [t for t in range(mask.shape[1]) if mask[b, t]]
        if cols:
            per_sample.append(sum(float(logp[b, t] - ref[b, t]) for t in cols) / len(cols))
    assert sample_mean_kl(logp, ref, mask) == pytest.approx(sum(per_sample) / 3, rel=1e-12)
    assert sample_mean_kl(logp, ref, torch.zeros_like(mask)) == 0.0


def test_adaptive_kl_follows_ziegler_and_fixed_stays():
    """coef *= 1 + clip(kl / target - 1, +-0.2) * n / horizon, written out by hand."""
    ctl = kl_controller("adaptive", kl_coef=0.05, target_kl=0.1, horizon=100)
    expected = 0.05
    for kl, n in [(0.3, 10), (0.12, 10), (0.05, 20), (0.0, 5), (0.1, 50)]:
        ctl.update(kl, n)
        error = {0.3: 0.2, 0.12: 0.2, 0.05: -0.5, 0.0: -1.0, 0.1: 0.0}[kl]  # kl/target - 1
        expected *= 1 + max(-0.2, min(0.2, error)) * n / 100
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert ctl.value != 0.05
    fixed = kl_controller("fixed", kl_coef=0.05, target_kl=0.1, horizon=100)
    fixed.update(10.0, 1000)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="'pid' is not one of: fixed, adaptive"):
        kl_controller("pid", kl_coef=0.05, target_kl=0.1, horizon=100)


@pytest.fixture(scope="module")
def char_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ppo") / "m")
    init_model(path, TINY)
    return path


def test_values_are_the_head_before_each_token(char_model):
    critic = TorchValueEngine.build(char_model, device=torch.device("cpu"), seed=1)
    policy = build_training_engine("torch", char_model, _cfg(char_model), device=torch.device("cpu"))
    prompts, completions, _ = _samples(3)
    batch = policy.pack(prompts, completions)
    values = critic.values(batch)
    body = critic.model.model
    with torch.no_grad():
        hidden = body(input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"]).last_hidden_state
        head = critic.model.score(hidden).squeeze(-1)
    assert torch.equal(values[:, 0], torch.zeros(3))
    torch.testing.assert_close(values[:, 1:], head[:, :-1])
    torch.testing.assert_close(position_values(critic.model, batch), values)


def test_ppo_updates_raise_high_scored_completions_and_fit_the_critic(char_model):
    cpu = torch.device("cpu")
    policy = build_training_engine("torch", char_model, _cfg(char_model), device=cpu,
                                   optimizer=OptimizerSpec(lr=3e-3, grad_clip=1.0))
    reference = build_training_engine("torch", char_model, _cfg(char_model), device=cpu)
    critic = TorchValueEngine.build(char_model, device=cpu, seed=0,
                                    optimizer=OptimizerSpec(lr=3e-3, grad_clip=1.0))
    prompts, completions, _ = _samples(16, seed=5)
    scores = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(16)])
    batch = policy.pack(prompts, completions)
    mask = batch["completion_mask"].bool()

    def preference() -> float:
        logp = policy.logprobs(batch, temperature=1.0)[0]
        seq = torch.where(mask, logp, 0.0).sum(-1)
        return float(seq[scores > 0].mean() - seq[scores < 0].mean())

    start = preference()
    losses = []
    settings = PPOSettings(kl_coef=0.01, epochs=2, minibatches=2, seed=3)
    for step in range(4):  # each time on-policy: the old log-probs are the current policy's
        logp = policy.logprobs(batch, temperature=1.0)[0]
        old = [logp[i, len(p):len(p) + len(c)].numpy() for i, (p, c) in
               enumerate(zip(prompts, completions))]
        metrics = ppo_update(policy, reference, critic, prompts, completions, old, scores,
                             settings, step=step)
        losses.append(metrics["vf_loss"])
        assert metrics["ppo_updates"] == 4.0
        if step == 0:  # on-policy, first minibatch: the ratio is 1
            assert metrics["kl_k1"] == pytest.approx(0.0, abs=1e-6)
    assert preference() > start + 1.0
    assert losses[-1] < losses[0]
