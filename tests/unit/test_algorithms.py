"""hpcalign.algorithms against straightforward loops over the papers' equations.

Each reference below is written independently of the library code: plain Python floats,
one sample and one token at a time, valid tokens found from the mask. Inputs include
masks with padding and holes, one-sample groups, all-equal rewards, unscored (NaN)
samples and empty batches.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from hpcalign.algorithms import (
    ADVANTAGE_ESTIMATORS,
    aggregate,
    gae,
    group_advantages,
    informative_groups,
    kl_estimate,
    kl_k3,
    policy_loss,
    register_advantage_estimator,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    value_loss,
    whiten,
)

NAN = math.nan


def _batch(seed: int = 0, n_groups: int = 5, length: int = 7):
    """Rewards, shuffled group ids (one group of one), a mask with right padding and a
    hole, per-token rewards, and a NaN reward."""
    rng = random.Random(seed)
    sizes = [4, 1, 3, 2, 5][:n_groups]
    groups = [10 * g + 3 for g, n in enumerate(sizes) for _ in range(n)]
    rng.shuffle(groups)
    rewards = [rng.choice([0.0, 0.5, 1.0]) + rng.random() * 0.1 for _ in groups]
    rewards[2] = NAN
    mask = []
    for _ in groups:
        n = rng.randint(1, length)
        row = [1] * n + [0] * (length - n)
        if n > 3 and rng.random() < 0.5:
            row[1] = 0  # a hole inside the completion
        mask.append(row)
    token_rewards = [[rng.uniform(-0.2, 0.1) for _ in range(length)] for _ in groups]
    return rewards, groups, mask, token_rewards


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def _valid(row):
    return [t for t, m in enumerate(row) if m]


# ----------------------------------------------------------------- outcome estimators
def _loop_group(rewards, groups, mask=None, token_rewards=None, *, scale=True, loo=False):
    returns = list(rewards)
    if token_rewards is not None:
        returns = [r + sum(token_rewards[i][t] for t in _valid(mask[i]))
                   for i, r in enumerate(rewards)]
    out = []
    for i, (r, g) in enumerate(zip(returns, groups)):
        members = [x for x, gg in zip(returns, groups) if gg == g and not math.isnan(x)]
        if math.isnan(r) or len(members) < 2:
            out.append(0.0)
            continue
        if loo:
            others = [x for j, (x, gg) in enumerate(zip(returns, groups))
                      if gg == g and j != i and not math.isnan(x)]
            out.append(r - sum(others) / len(others))
        else:
            mean = sum(members) / len(members)
            out.append((r - mean) / (statistics.stdev(members) + 1e-6) if scale else r - mean)
    return out


@pytest.mark.parametrize("with_tokens", [False, True])
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_the_loop(with_tokens, scale):
    rewards, groups, mask, token_rewards = _batch(1)
    kwargs = {"mask": _t(mask), "token_rewards": _t(token_rewards)} if with_tokens else {}
    got = group_advantages(_t(rewards), torch.tensor(groups), scale_by_std=scale, **kwargs)
    want = _loop_group(rewards, groups, mask if with_tokens else None,
                       token_rewards if with_tokens else None, scale=scale)
    torch.testing.assert_close(got, _t(want), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_tokens", [False, True])
def test_rloo_matches_the_leave_one_out_loop(with_tokens):
    rewards, groups, mask, token_rewards = _batch(2)
    kwargs = {"mask": _t(mask), "token_rewards": _t(token_rewards)} if with_tokens else {}
    got = rloo_advantages(_t(rewards), torch.tensor(groups), **kwargs)
    want = _loop_group(rewards, groups, mask if with_tokens else None,
                       token_rewards if with_tokens else None, loo=True)
    torch.testing.assert_close(got, _t(want), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------- REINFORCE++
def _loop_whiten(values, mask, eps=1e-8):
    flat = [values[i][t] for i in range(len(values)) for t in _valid(mask[i])]
    if not flat:
        return [[0.0] * len(row) for row in values]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1) if len(flat) > 1 else 0.0
    return [[(values[i][t] - mean) / math.sqrt(var + eps) if mask[i][t] else 0.0
             for t in range(len(values[i]))] for i in range(len(values))]


def _loop_reinforce_pp(rewards, mask, token_rewards=None, gamma=1.0, baseline=None):
    """Hu 2025: r_t = 1[t = last] R - beta KL_t; G_t = sum_{s>=t} gamma^(s-t) r_s (over the
    valid tokens); whitened over every valid token of the scored samples."""
    returns, keep = [], []
    for i, r in enumerate(rewards):
        valid = _valid(mask[i]) if not math.isnan(r) else []
        outcome = r - (baseline[i] if baseline else 0.0)
        row = [0.0] * len(mask[i])
        for k, t in enumerate(valid):
            total = 0.0
            for j, s in enumerate(valid[k:]):
                step_reward = token_rewards[i][s] if token_rewards else 0.0
                if s == valid[-1]:
                    step_reward += outcome
                total += gamma ** j * step_reward
            row[t] = total
        returns.append(row)
        keep.append([1 if t in valid else 0 for t in range(len(mask[i]))])
    return _loop_whiten(returns, keep)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("with_tokens", [False, True])
def test_reinforce_pp_matches_the_loop(gamma, with_tokens):
    rewards, groups, mask, token_rewards = _batch(3)
    tr = token_rewards if with_tokens else None
    got = reinforce_pp_advantages(_t(rewards), torch.tensor(groups), mask=_t(mask),
                                  token_rewards=_t(tr) if tr else None, gamma=gamma)
    want = _loop_reinforce_pp(rewards, mask, tr, gamma)
    assert got.shape == (len(rewards), len(mask[0]))
    torch.testing.assert_close(got, _t(want), rtol=1e-7, atol=1e-9)
    assert float(got[2].abs().sum()) == 0.0  # the NaN reward


@pytest.mark.parametrize("with_tokens", [False, True])
def test_reinforce_pp_baseline_matches_the_loop(with_tokens):
    rewards, groups, mask, token_rewards = _batch(4)
    tr = token_rewards if with_tokens else None
    baseline = []
    for g in groups:  # group mean of the scored outcome rewards
        members = [r for r, gg in zip(rewards, groups) if gg == g and not math.isnan(r)]
        baseline.append(sum(members) / len(members) if members else 0.0)
    got = reinforce_pp_baseline_advantages(_t(rewards), torch.tensor(groups), mask=_t(mask),
                                           token_rewards=_t(tr) if tr else None)
    want = _loop_reinforce_pp(rewards, mask, tr, 1.0, baseline=baseline)
    torch.testing.assert_close(got, _t(want), rtol=1e-7, atol=1e-9)


def test_one_sample_groups_all_equal_rewards_and_empty_batches():
    one = _t([0.7, 0.2])
    zeros = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(group_advantages(one, torch.tensor([0, 1])), zeros)
    assert torch.equal(rloo_advantages(one, torch.tensor([0, 1])), zeros)
    equal = torch.full((6,), 0.3)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.ones(6, 4)
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        got = fn(equal, ids, mask=mask)
        torch.testing.assert_close(got, torch.zeros_like(got), atol=1e-6, rtol=0, msg=name)
        empty = fn(torch.zeros(0), torch.zeros(0, dtype=torch.long), mask=torch.zeros(0, 4))
        assert empty.numel() == 0 and empty.shape[0] == 0, name
        assert torch.isfinite(fn(_t([NAN, NAN]), torch.tensor([0, 0]), mask=torch.ones(2, 3))).all()
    # a single valid token in the whole batch: no spread to whiten by, advantage 0
    single = reinforce_pp_advantages(_t([1.0]), None, mask=_t([[0, 1, 0]]))
    assert torch.equal(single, torch.zeros(1, 3, dtype=torch.float64))


def test_registry_names_every_estimator_with_one_signature():
    assert ADVANTAGE_ESTIMATORS == {
        "grpo": group_advantages, "rloo": rloo_advantages,
        "reinforce_pp": reinforce_pp_advantages,
        "reinforce_pp_baseline": reinforce_pp_baseline_advantages}
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="token-level"):
        reinforce_pp_advantages(torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="mask"):
        group_advantages(torch.ones(2), torch.zeros(2), token_rewards=torch.ones(2, 3))


def test_informative_groups_keep_only_groups_with_differing_rewards():
    rewards, groups, _, _ = _batch(5)
    rewards[0] = rewards[1]
    equal_group = groups[0]
    for i, g in enumerate(groups):
        if g == equal_group:
            rewards[i] = 0.1 + 0.2  # equal rewards whose float mean is not exact
    got = informative_groups(_t(rewards), torch.tensor(groups)).tolist()
    for i, g in enumerate(groups):
        scored = {r for r, gg in zip(rewards, groups) if gg == g and not math.isnan(r)}
        assert got[i] == (len(scored) > 1), (i, g)
    assert informative_groups(torch.zeros(0), torch.zeros(0)).numel() == 0


# ----------------------------------------------------------------- GAE and whitening
def test_gae_matches_the_loop_over_valid_tokens():
    _, _, mask, token_rewards = _batch(6)
    rng = random.Random(6)
    values = [[rng.uniform(-1, 1) for _ in row] for row in mask]
    gamma, lam = 0.95, 0.8
    adv, ret = gae(_t(token_rewards), _t(values), _t(mask), gamma, lam)
    for i, row in enumerate(mask):
        valid = _valid(row)
        for k, t in enumerate(valid):
            expected = 0.0  # A_t = sum_l (gamma lam)^l delta_{t+l}, V after the end = 0
            for j, s in enumerate(valid[k:]):
                nxt = values[i][valid[k + j + 1]] if k + j + 1 < len(valid) else 0.0
                delta = token_rewards[i][s] + gamma * nxt - values[i][s]
                expected += (gamma * lam) ** j * delta
            assert float(adv[i, t]) == pytest.approx(expected, rel=1e-10, abs=1e-12)
            assert float(ret[i, t]) == pytest.approx(expected + values[i][t], rel=1e-10, abs=1e-12)
        assert all(float(adv[i, t]) == 0.0 == float(ret[i, t])
                   for t in range(len(row)) if not row[t])
    empty = gae(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), 1.0, 1.0)
    assert empty[0].shape == (0, 3)


def test_whiten_matches_the_loop():
    _, _, mask, token_rewards = _batch(7)
    got = whiten(_t(token_rewards), _t(mask))
    torch.testing.assert_close(got, _t(_loop_whiten(token_rewards, mask)), rtol=1e-9, atol=1e-12)
    kept_mean = whiten(_t(token_rewards), _t(mask), shift_mean=False)
    flat = [token_rewards[i][t] for i in range(len(mask)) for t in _valid(mask[i])]
    mean = statistics.fmean(flat)
    for i, row in enumerate(mask):
        for t in _valid(row):
            assert float(kept_mean[i, t]) == pytest.approx(
                (token_rewards[i][t] - mean) / math.sqrt(statistics.variance(flat) + 1e-8) + mean)
    assert whiten(torch.zeros(0, 2), torch.zeros(0, 2)).shape == (0, 2)


# ----------------------------------------------------------------- KL
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_follow_schulman(kind):
    logp = [-1.0, -2.0, -0.5, -3.0, -0.1]
    ref = [-1.0, -1.0, -2.5, -0.1, -0.2]
    got = kl_estimate(_t(logp), _t(ref), kind)
    for i, (lp, rp) in enumerate(zip(logp, ref)):
        log_r = rp - lp  # r = pi_ref / pi
        want = {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": math.exp(log_r) - 1 - log_r}[kind]
        assert float(got[i]) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert float(got[0]) == 0.0
    if kind != "k1":
        assert bool((got >= 0).all())
    assert torch.equal(kl_estimate(_t(logp), _t(ref)), kl_k3(_t(logp), _t(ref)))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(_t(logp), _t(ref), "k4")


# ----------------------------------------------------------------- policy loss
def _loop_policy_loss(logp, old, ref, adv, mask, *, low, high, agg, kl_coef, kind,
                      sequence=False, norm_length=None):
    """-min(w A, clip(w, 1-low, 1+high) A) + kl_coef KL per token, then the aggregation."""
    per_seq_sum, per_seq_tokens, total_tokens = [], [], 0
    for b in range(len(logp)):
        valid = _valid(mask[b])
        seq_log_ratio = (sum(logp[b][t] - old[b][t] for t in valid) / len(valid)) if valid else 0.0
        row = 0.0
        for t in valid:
            w = math.exp(seq_log_ratio if sequence else logp[b][t] - old[b][t])
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            surrogate = min(w * a, min(max(w, 1 - low), 1 + high) * a)
            d = ref[b][t] - logp[b][t]
            kl = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[kind]
            row += -surrogate + kl_coef * kl
        per_seq_sum.append(row)
        per_seq_tokens.append(len(valid))
        total_tokens += len(valid)
    seqs = max(sum(1 for n in per_seq_tokens if n), 1)
    if agg == "token-mean":
        return sum(per_seq_sum) / max(total_tokens, 1)
    if agg == "seq-mean-token-sum":
        return sum(per_seq_sum) / seqs
    if agg == "seq-mean-token-mean":
        return sum(s / n for s, n in zip(per_seq_sum, per_seq_tokens) if n) / seqs
    return sum(per_seq_sum) / (seqs * norm_length)


def _loss_inputs(seed=0, B=6, T=8, token_adv=False):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp = old + (torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5) * 0.9
    ref = old + (torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5)
    mask = (torch.rand(B, T, generator=gen) > 0.3).long()
    mask[:, 0] = 0  # a prompt position
    mask[-1] = 0  # an all-padding row
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64) if token_adv else \
        torch.randn(B, generator=gen, dtype=torch.float64)
    logp[mask == 0] = 50.0  # garbage in padding must not matter
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("token_adv", [False, True])
def test_policy_loss_matches_the_loop(agg, kind, token_adv):
    logp, old, ref, adv, mask = _loss_inputs(1, token_adv=token_adv)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(lp, old, adv, mask, clip_eps_low=0.1, clip_eps_high=0.28,
                                aggregation=agg, ref_logp=ref, kl_coef=0.05, kl_estimator=kind,
                                norm_length=8)
    want = _loop_policy_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                             mask.tolist(), low=0.1, high=0.28, agg=agg, kl_coef=0.05,
                             kind=kind, norm_length=8)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert 0 < metrics["clip_frac"] < 1
    loss.backward()
    assert float(lp.grad[mask == 0].abs().sum()) == 0.0


def test_asymmetric_clip_bounds_are_where_they_say():
    """A > 0 stops gaining past 1 + high, A < 0 past 1 - low (DAPO's clip-higher)."""
    for log_w, a, low, high, active in [(math.log(1.25), 1.0, 0.2, 0.28, False),
                                        (math.log(1.30), 1.0, 0.2, 0.28, True),
                                        (math.log(0.85), -1.0, 0.1, 0.28, True),
                                        (math.log(0.85), -1.0, 0.2, 0.28, False)]:
        lp = torch.tensor([[log_w]], requires_grad=True)
        loss, metrics = policy_loss(lp, torch.zeros(1, 1), torch.tensor([a]), torch.ones(1, 1),
                                    clip_eps_low=low, clip_eps_high=high)
        loss.backward()
        assert metrics["clip_frac"] == float(active)
        assert (float(lp.grad) == 0.0) == active


def test_sequence_ratio_is_gspo():
    """GSPO eq. 7: -(1/G) sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log w_t):
    the value AND the gradient of a direct implementation (autograd through it)."""
    logp, old, ref, adv, mask = _loss_inputs(2, B=5, T=6)
    logp[mask == 0] = -1.0
    lp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(lp, old, adv, mask, clip_eps_low=0.03, clip_eps_high=0.04,
                          aggregation="seq-mean-token-mean", importance_ratio="sequence")
    loss.backward()
    direct = logp.clone().requires_grad_(True)
    terms = []
    for i in range(len(mask)):
        valid = _valid(mask[i].tolist())
        if not valid:
            continue
        s = torch.exp(sum(direct[i, t] - old[i, t] for t in valid) / len(valid))
        terms.append(-torch.minimum(s * adv[i], s.clamp(1 - 0.03, 1 + 0.04) * adv[i]))
    expected = sum(terms) / len(terms)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(lp.grad, direct.grad, rtol=1e-10, atol=1e-12)
    want = _loop_policy_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                             mask.tolist(), low=0.03, high=0.04, agg="token-mean",
                             kl_coef=0.0, kind="k3", sequence=True)
    got, _ = policy_loss(logp, old, adv, mask, clip_eps_low=0.03, clip_eps_high=0.04,
                         importance_ratio="sequence")
    assert got.item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
def test_parts_with_global_counts_add_up_to_the_whole(agg):
    """Micro-batches / data-parallel ranks: each part normalised by the global counts."""
    logp, old, ref, adv, mask = _loss_inputs(3)
    counts = {"token_count": float(mask.sum()), "seq_count": float(mask.any(-1).sum()),
              "norm_length": 8.0}
    kwargs = {"clip_eps_low": 0.2, "aggregation": agg, "ref_logp": ref, "kl_coef": 0.1}
    whole, _ = policy_loss(logp, old, adv, mask, **kwargs, **counts)
    parts = [policy_loss(logp[s], old[s], adv[s], mask[s], **{**kwargs, "ref_logp": ref[s]},
                         **counts)[0] for s in (slice(0, 2), slice(2, None))]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-12)
    assert float(aggregate(torch.ones(0, 3), torch.zeros(0, 3), agg)) == 0.0


def test_policy_loss_errors_name_the_problem():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(x, x, torch.zeros(2), x, kl_coef=0.1)
    with pytest.raises(ValueError, match="importance_ratio"):
        policy_loss(x, x, torch.zeros(2), x, importance_ratio="group")
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(x, x, torch.zeros(2), x, aggregation="mean")


# ----------------------------------------------------------------- value loss
@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_matches_the_loop(clip):
    _, _, mask, returns = _batch(8)
    rng = random.Random(8)
    old = [[r + rng.uniform(-0.5, 0.5) for r in row] for row in returns]
    values = [[v + rng.uniform(-0.5, 0.5) for v in row] for row in old]
    loss, metrics = value_loss(_t(values), _t(old), _t(returns), _t(mask), clip_eps=clip)
    total = clipped = n = 0
    for i, row in enumerate(mask):
        for t in _valid(row):
            plain = (values[i][t] - returns[i][t]) ** 2
            if clip is None:
                worst = plain
            else:
                vc = old[i][t] + min(max(values[i][t] - old[i][t], -clip), clip)
                worst = max(plain, (vc - returns[i][t]) ** 2)
                clipped += (vc - returns[i][t]) ** 2 > plain
            total += 0.5 * worst
            n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-12)
    assert metrics["vf_clip_frac"] == pytest.approx(clipped / n)
    assert (metrics["vf_clip_frac"] > 0) == (clip is not None)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum",
                                         "seq-mean-token-mean"])
@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_policy_and_value_losses_of_an_empty_batch_are_zero_and_differentiable(aggregation,
                                                                               ratio):
    """A rank whose share of a step is empty (every group dropped) still joins the
    gradient all-reduce: its losses are finite zeros with a graph, its metrics zeros."""
    logp = torch.zeros(0, 5, requires_grad=True)
    values = torch.zeros(0, 5, requires_grad=True)
    mask = torch.zeros(0, 5, dtype=torch.bool)
    loss, parts = policy_loss(logp, torch.zeros(0, 5), torch.zeros(0), mask,
                              aggregation=aggregation, importance_ratio=ratio,
                              ref_logp=torch.zeros(0, 5), kl_coef=0.1)
    vloss, vparts = value_loss(values, torch.zeros(0, 5), torch.zeros(0, 5), mask,
                               aggregation=aggregation)
    for value, metrics in ((loss, parts), (vloss, vparts)):
        assert value.item() == 0.0 and all(v == 0.0 for v in metrics.values()), metrics
    (loss + vloss).backward()
    assert logp.grad.shape == (0, 5) and values.grad.shape == (0, 5)
