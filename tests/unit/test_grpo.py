"""GRPO math against straightforward Python loops over groups and tokens."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from hpcalign.algorithms.grpo import (
    ADVANTAGE_ESTIMATORS,
    group_advantages,
    grpo_loss,
    kl_k3,
    rloo_advantages,
    sft_loss,
)


def _rewards_and_groups(seed: int = 0):
    rng = random.Random(seed)
    sizes = [4, 1, 3, 8, 2]  # includes a group of one
    groups = [g * 7 + 3 for g, n in enumerate(sizes) for _ in range(n)]  # arbitrary ids
    rng.shuffle(groups)  # group members need not be contiguous
    rewards = [rng.choice([0.0, 0.25, 1.0]) if g != 10 else rng.random() for g in groups]
    return rewards, groups


def test_group_advantages_match_a_loop_over_groups():
    rewards, groups = _rewards_and_groups()
    got = group_advantages(torch.tensor(rewards), torch.tensor(groups), eps=1e-6)
    got_mean_only = group_advantages(torch.tensor(rewards), torch.tensor(groups), scale_by_std=False)
    for i, (r, g) in enumerate(zip(rewards, groups)):
        members = [rr for rr, gg in zip(rewards, groups) if gg == g]
        mean = sum(members) / len(members)
        std = statistics.stdev(members) if len(members) > 1 else 0.0  # unbiased (n - 1)
        assert float(got[i]) == pytest.approx((r - mean) / (std + 1e-6), abs=1e-5)
        assert float(got_mean_only[i]) == pytest.approx(r - mean, abs=1e-6)
    assert got.dtype == torch.float32 and got.shape == (len(rewards),)


def test_equal_rewards_give_zero_advantage():
    adv = group_advantages(torch.ones(6), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.equal(adv, torch.zeros(6))


def test_rloo_matches_leave_one_out_loop():
    rewards, groups = _rewards_and_groups(1)
    got = rloo_advantages(torch.tensor(rewards), torch.tensor(groups))
    for i, (r, g) in enumerate(zip(rewards, groups)):
        others = [rr for j, (rr, gg) in enumerate(zip(rewards, groups)) if gg == g and j != i]
        expected = r - sum(others) / len(others) if others else 0.0
        assert float(got[i]) == pytest.approx(expected, abs=1e-6)
    assert ADVANTAGE_ESTIMATORS["grpo"] is group_advantages
    assert ADVANTAGE_ESTIMATORS["rloo"] is rloo_advantages


def test_kl_k3_formula_and_sign():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    ref = torch.tensor([-1.0, -1.0, -2.5, -0.1])
    got = kl_k3(logp, ref)
    for i in range(4):
        d = float(ref[i] - logp[i])
        assert float(got[i]) == pytest.approx(math.exp(d) - d - 1, rel=1e-6, abs=1e-7)
    assert float(got[0]) == 0.0 and bool((got >= 0).all())


def _loop_loss(logp, old, ref, adv, mask, clip_eps, kl_coef, count):
    total = pg_sum = kl_sum = clipped = ratio_sum = 0.0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            surrogate = min(ratio * adv[b], max(min(ratio, 1 + clip_eps), 1 - clip_eps) * adv[b])
            d = ref[b][t] - logp[b][t]
            k3 = math.exp(d) - d - 1
            total += -surrogate + kl_coef * k3
            pg_sum += -surrogate
            kl_sum += k3
            clipped += surrogate < ratio * adv[b]
            ratio_sum += ratio
    return total / count, {"pg_loss": pg_sum / count, "kl": kl_sum / count,
                           "clip_frac": clipped / count, "ratio_mean": ratio_sum / count}


@pytest.mark.parametrize("token_count", [None, 40.0])
def test_grpo_loss_matches_a_per_token_loop(token_count):
    gen = torch.Generator().manual_seed(0)
    B, T = 5, 7
    old = -torch.rand(B, T, generator=gen) * 3
    logp = old + (torch.rand(B, T, generator=gen) - 0.5) * 0.8  # ratios in ~[0.67, 1.5]
    ref = old + (torch.rand(B, T, generator=gen) - 0.5)
    adv = torch.tensor([1.5, -0.7, 0.0, 2.0, -1.2])
    mask = (torch.rand(B, T, generator=gen) > 0.3).long()
    mask[:, 0] = 0
    logp = logp.double().requires_grad_(True)
    loss, metrics = grpo_loss(logp, old.double(), ref.double(), adv, mask, clip_eps=0.2,
                              kl_coef=0.05, token_count=token_count)
    count = float(mask.sum()) if token_count is None else token_count
    expected, expected_metrics = _loop_loss(logp.tolist(), old.tolist(), ref.tolist(),
                                            adv.tolist(), mask.tolist(), 0.2, 0.05, count)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert 0 < metrics["clip_frac"] < 1  # both branches are exercised
    loss.backward()
    assert float(logp.grad[mask == 0].abs().sum()) == 0.0


def test_grpo_loss_gradient_on_policy_and_when_clipped():
    # on-policy (ratio 1, logp == ref): d loss / d logp = -A / count per masked token
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    loss, metrics = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2,
                              kl_coef=0.1)
    loss.backward()
    expected = -adv.unsqueeze(1) * mask / 4
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["kl"] == 0.0
    # ratio above 1 + eps with A > 0: the clipped term is constant, no policy gradient
    logp2 = torch.tensor([[0.5]], requires_grad=True)
    loss2, metrics2 = grpo_loss(logp2, torch.zeros(1, 1), logp2.detach(), torch.tensor([1.0]),
                                torch.ones(1, 1), clip_eps=0.2, kl_coef=0.0)
    loss2.backward()
    assert float(logp2.grad) == 0.0 and metrics2["clip_frac"] == 1.0
    assert loss2.item() == pytest.approx(-1.2)


def test_all_masked_batch_is_zero_not_nan():
    z = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = grpo_loss(z, z.detach(), z.detach(), torch.ones(2), torch.zeros(2, 3),
                              clip_eps=0.2, kl_coef=0.1)
    assert loss.item() == 0.0 and all(v == 0.0 for v in metrics.values())


def test_sft_loss_is_token_mean_nll():
    logp = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -4.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    assert float(sft_loss(logp, mask)) == pytest.approx((1.0 + 2.0 + 4.0) / 3)


def test_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        grpo_loss(x, x, x, torch.zeros(3), x, clip_eps=0.2, kl_coef=0.0)
    with pytest.raises(ValueError):
        grpo_loss(x, x[:, :2], x, torch.zeros(2), x, clip_eps=0.2, kl_coef=0.0)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(2))


def test_unscorable_samples_get_zero_advantage_and_leave_the_group_baseline():
    """NaN rewards (every reward function returned None), as TRL's GRPOTrainer treats them:
    advantage 0, and the group's mean and std are those of its scored members only."""
    rewards, groups = _rewards_and_groups(seed=5)
    rng = random.Random(1)
    for i in rng.sample(range(len(rewards)), 6):
        rewards[i] = math.nan
    whole = [g for g in set(groups) if groups.count(g) == 3][0]
    for i, g in enumerate(groups):
        if g == whole:
            rewards[i] = math.nan  # a group with no scored member at all
    got = group_advantages(torch.tensor(rewards), torch.tensor(groups), eps=1e-6)
    rloo = rloo_advantages(torch.tensor(rewards), torch.tensor(groups))
    assert torch.isfinite(got).all() and torch.isfinite(rloo).all()
    for i, (r, g) in enumerate(zip(rewards, groups)):
        if math.isnan(r):
            assert float(got[i]) == 0.0 and float(rloo[i]) == 0.0
            continue
        scored = [rr for rr, gg in zip(rewards, groups) if gg == g and not math.isnan(rr)]
        mean = statistics.fmean(scored)
        std = statistics.stdev(scored) if len(scored) > 1 else 0.0
        assert float(got[i]) == pytest.approx((r - mean) / (std + 1e-6), abs=1e-5)
        expected_rloo = (r - mean) * len(scored) / (len(scored) - 1) if len(scored) > 1 else 0.0
        assert float(rloo[i]) == pytest.approx(expected_rloo, abs=1e-6)
    # without NaNs nothing changes: the same numbers as a plain computation
    clean = torch.tensor([0.0, 1.0, 0.5, 0.25])
    assert torch.equal(group_advantages(clean, torch.zeros(4, dtype=torch.long)),
                       ((clean.double() - clean.double().mean()) /
                        (clean.double().std() + 1e-6)).float())
