"""dpo_loss against a loop over pairs written from TRL DPOTrainer's definitions."""

from __future__ import annotations

import math

import pytest
import torch

from hpcalign.algorithms import DPO_LOSS_TYPES, dpo_implicit_rewards, dpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _loop(pc, pr, rc, rr, beta, loss_type, ls):
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = (a - b) - (c - d)
        if loss_type == "sigmoid":
            out.append(-(1 - ls) * _log_sigmoid(beta * h) - ls * _log_sigmoid(-beta * h))
        elif loss_type == "robust":
            out.append((-(1 - ls) * _log_sigmoid(beta * h) + ls * _log_sigmoid(-beta * h))
                       / (1 - 2 * ls))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * h))
        else:
            out.append((h - 1 / (2 * beta)) ** 2)
    return out


def _pairs(n=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=gen, dtype=torch.float64) * 30) for _ in range(4)]


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dpo_loss_matches_the_loop(loss_type, beta, ls):
    if ls and loss_type in ("hinge", "ipo"):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(*_pairs(), beta, loss_type, ls)
        return
    pc, pr, rc, rr = _pairs()
    got = dpo_loss(pc, pr, rc, rr, beta, loss_type, ls)
    want = _loop(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, loss_type, ls)
    assert got.shape == (9,)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_dpo_loss_gradient_raises_the_margin_and_known_values():
    zero = torch.zeros(1, dtype=torch.float64)
    assert float(dpo_loss(zero, zero, zero, zero, 0.1)) == pytest.approx(math.log(2))
    # -log sigma(0.2) for a margin of 2 at beta 0.1; IPO's target margin 1/(2 beta) = 5
    two = torch.tensor([2.0], dtype=torch.float64)
    assert float(dpo_loss(two, zero, zero, zero, 0.1)) == pytest.approx(0.598139, abs=1e-6)
    assert float(dpo_loss(torch.tensor([5.0]), zero, zero, zero, 0.1, "ipo")) == 0.0
    chosen = torch.tensor([-3.0], requires_grad=True)
    ref = torch.tensor([-2.5])
    dpo_loss(chosen, torch.tensor([-2.0]), ref, ref, 0.2).sum().backward()
    assert float(chosen.grad) < 0  # descending raises the chosen log-prob
    rewards = dpo_implicit_rewards(torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0]), 0.5)
    assert rewards.tolist() == [0.5, -0.5]


def test_dpo_loss_checks_its_inputs_and_takes_empty_batches():
    empty = torch.zeros(0)
    assert dpo_loss(empty, empty, empty, empty, 0.1).shape == (0,)
    one = torch.zeros(2)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(one, torch.zeros(3), one, one, 0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(one, one, one, one, 0.0)
    with pytest.raises(ValueError, match="loss_type 'kto'"):
        dpo_loss(one, one, one, one, 0.1, "kto")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(one, one, one, one, 0.1, "robust", 0.5)
