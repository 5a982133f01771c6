"""The GRPO family as trainer options: config checks, and the update on a real tiny model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_engines import _samples

from hpcalign.algorithms import group_advantages, kl_estimate
from hpcalign.config.load import load_config
from hpcalign.config.schema import ModelInit, TrainerConfig
from hpcalign.engines import OptimizerSpec, build_training_engine
from hpcalign.errors import ConfigError
from hpcalign.models.tiny import init_model
from hpcalign.roles.update import prepare_update, run_update, step_advantages

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml")


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("family") / "char")
    init_model(path, ModelInit(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64))
    return path


def _engines(path: str):
    cfg = load_config(QUICKSTART, [f"model.path={path}", "run_dir=/tmp/unused"])
    policy = build_training_engine("torch", path, cfg, device=torch.device("cpu"),
                                   optimizer=OptimizerSpec(lr=3e-2, grad_clip=1.0))
    return policy, build_training_engine("torch", path, cfg, device=torch.device("cpu"))


def test_defaults_are_grpo_and_bad_combinations_are_refused_by_key():
    tcfg = TrainerConfig()
    assert (tcfg.advantage_estimator, tcfg.loss_aggregation, tcfg.kl_estimator,
            tcfg.importance_ratio, tcfg.updates_per_batch) == ("grpo", "token-mean", "k3",
                                                               "token", 1)
    assert tcfg.scale_rewards and not tcfg.kl_in_reward and not tcfg.dynamic_sampling
    assert tcfg.clip_eps_low is None and tcfg.clip_eps_high is None
    cases = {("trainer.advantage_estimator=ppo",): "trainer.advantage_estimator='ppo'",
             ("trainer.advantage_estimator=rloo", "trainer.scale_rewards=false"):
                 "trainer.scale_rewards=false applies to advantage_estimator=grpo",
             ("trainer.kl_in_reward=true", "trainer.kl_coef=0"): "trainer.kl_in_reward=true",
             ("trainer.clip_eps_low=1.5",): "trainer.clip_eps_low=1.5",
             ("trainer.updates_per_batch=0",): "trainer.updates_per_batch=0",
             ("trainer.loss_aggregation=mean",): "seq-mean-token-mean"}
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_config(QUICKSTART, ["run_dir=/tmp/x", *overrides])


def test_several_updates_use_the_trainers_old_logprobs(char_dir):
    """updates_per_batch=2: the ratio's denominator is the policy before the first update
    (ratio exactly 1 there), and the two steps equal two plain steps on those numbers."""
    prompts, completions, old = _samples(6)
    advantages = torch.linspace(-1, 1, 6)
    tokens = float(sum(len(c) for c in completions))
    two = TrainerConfig(updates_per_batch=2, kl_coef=0.05)
    policy, reference = _engines(char_dir)
    prepared = prepare_update(policy, reference, prompts, completions, old, two, temperature=1.0)
    for prox, batch in zip(prepared.prox_of, prepared.micro_batches):
        assert torch.equal(prox, policy.logprobs(batch, temperature=1.0)[0])
    first = run_update(policy, prepared, advantages, tokens,
                       TrainerConfig(updates_per_batch=1, kl_coef=0.05), temperature=1.0)
    assert first.metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    second = run_update(policy, prepared, advantages, tokens,
                        TrainerConfig(updates_per_batch=1, kl_coef=0.05), temperature=1.0)
    assert abs(second.metrics["ratio_mean"] - 1.0) > 1e-4  # the policy has moved

    other, reference = _engines(char_dir)
    prepared = prepare_update(other, reference, prompts, completions, old, two, temperature=1.0)
    result = run_update(other, prepared, advantages, tokens, two, temperature=1.0)
    for (name, a), (_, b) in zip(policy.named_weights(), other.named_weights()):
        assert torch.equal(a, b), name
    for key in first.metrics:
        assert result.metrics[key] == pytest.approx(
            (first.metrics[key] + second.metrics[key]) / 2, rel=1e-12, abs=1e-15), key


def test_kl_in_reward_changes_the_grpo_return_by_the_summed_kl(char_dir):
    policy, reference = _engines(char_dir)
    policy.train_step([policy.pack(*_samples(4, seed=9)[:2])],  # move off the reference
                      lambda i, b, logp, e: (-(logp * b["completion_mask"]).sum(), {}),
                      temperature=1.0)
    prompts, completions, old = _samples(8, seed=1)
    tcfg = TrainerConfig(kl_in_reward=True, kl_coef=0.5, kl_estimator="k1", micro_batch=3,
                         updates_per_batch=2)
    prepared = prepare_update(policy, reference, prompts, completions, old, tcfg,
                              temperature=1.0)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.9, 0.1, 0.4])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    lengths = np.array([len(c) for c in completions])
    got = step_advantages(tcfg, rewards, groups, lengths, prepared, np.arange(8))
    kl_sums = []
    for prompt, completion in zip(prompts, completions):  # the KL, sample by sample
        batch = policy.pack([prompt], [completion])
        start = len(prompt)
        span = slice(start, start + len(completion))
        kl = kl_estimate(policy.logprobs(batch, temperature=1.0)[0][0, span],
                         reference.logprobs(batch, temperature=1.0)[0][0, span], "k1")
        kl_sums.append(float(kl.double().sum()))
    want = group_advantages(rewards.double() - 0.5 * torch.tensor(kl_sums, dtype=torch.float64),
                            groups).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, group_advantages(rewards, groups), atol=1e-3)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_logged_kl_is_the_configured_estimator(char_dir, kind):
    """The step's `kl` metric is the token mean of `trainer.kl_estimator` (before the
    update), recomputed here sample by sample."""
    policy, reference = _engines(char_dir)
    policy.train_step([policy.pack(*_samples(4, seed=9)[:2])],  # move off the reference
                      lambda i, b, logp, e: (-(logp * b["completion_mask"]).sum(), {}),
                      temperature=1.0)
    prompts, completions, old = _samples(6, seed=2)
    tcfg = TrainerConfig(kl_coef=0.0, kl_estimator=kind, micro_batch=4)
    total, tokens = 0.0, 0
    for prompt, completion in zip(prompts, completions):
        batch = policy.pack([prompt], [completion])
        span = slice(len(prompt), len(prompt) + len(completion))
        kl = kl_estimate(policy.logprobs(batch, temperature=1.0)[0][0, span],
                         reference.logprobs(batch, temperature=1.0)[0][0, span], kind)
        total, tokens = total + float(kl.double().sum()), tokens + len(completion)
    prepared = prepare_update(policy, reference, prompts, completions, old, tcfg,
                              temperature=1.0)
    result = run_update(policy, prepared, torch.linspace(-1, 1, 6), float(tokens), tcfg,
                        temperature=1.0)
    assert result.metrics["kl"] == pytest.approx(total / tokens, rel=1e-4, abs=1e-7)


def test_token_level_advantages_reach_the_right_tokens(char_dir):
    """reinforce_pp gives [n, T_completion]; each value lands on its completion token."""
    policy, reference = _engines(char_dir)
    prompts, completions, old = _samples(5, seed=2)
    tcfg = TrainerConfig(advantage_estimator="reinforce_pp", micro_batch=2)
    prepared = prepare_update(policy, reference, prompts, completions, old, tcfg, temperature=1.0)
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.8, 0.5])
    lengths = np.array([len(c) for c in completions])
    advantages = step_advantages(tcfg, rewards, torch.zeros(5, dtype=torch.long), lengths,
                                 prepared, np.arange(5))
    assert advantages.shape == (5, lengths.max())
    # only the outcome, gamma 1: every token of a completion has the same return
    for i, n in enumerate(lengths):
        assert torch.allclose(advantages[i, :n], advantages[i, :1].expand(n))
        assert float(advantages[i, n:].abs().sum()) == 0.0
    from hpcalign.roles.update import _packed_advantages

    for packed, batch, rows in zip(_packed_advantages(prepared, advantages),
                                   prepared.micro_batches, prepared.rows_of):
        mask = batch["completion_mask"].bool()
        for row, i in enumerate(rows.tolist()):
            assert torch.equal(packed[row][mask[row]], advantages[i, :lengths[i]])
            assert float(packed[row][~mask[row]].abs().sum()) == 0.0
    result = run_update(policy, prepared, advantages, float(lengths.sum()), tcfg, temperature=1.0)
    assert np.isfinite(result.metrics["loss"]) and result.metrics["pg_loss"] != 0.0
