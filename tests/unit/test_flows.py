"""The flow API (hpcalign/flows): resolving `algorithm:`, user flows by import path and
their errors, the static schedule's digest, and the example flow's selection."""

import os
import sys

import numpy as np
import pytest
import torch

from hpcalign.errors import UserError
from hpcalign.flows import BUILTIN_FLOWS, Experience, Flow, check_schedule, resolve_flow
from hpcalign.flows.api import schedule_digest
from hpcalign.flows.grpo import GRPOFlow
from hpcalign.flows.online_dpo import OnlineDPOFlow
from hpcalign.flows.ppo import PPOFlow

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from raft_flow import RaftFlow  # noqa: E402


class NotAFlow:
    pass


class NeedsCritic(Flow):
    models = ("policy", "critic")


class Scaled(Flow):
    models = ("policy",)

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha


def make_not_a_flow():
    return NotAFlow()


def test_builtin_names_resolve_to_their_flows():
    assert isinstance(resolve_flow("grpo"), GRPOFlow)
    assert isinstance(resolve_flow("online_dpo"), OnlineDPOFlow)
    assert isinstance(resolve_flow("ppo"), PPOFlow)
    assert set(BUILTIN_FLOWS) == {"grpo", "online_dpo", "ppo"}


def test_a_user_flow_by_import_path_gets_its_arguments():
    flow = resolve_flow(f"{__name__}:Scaled", {"alpha": 0.5})
    assert isinstance(flow, Scaled) and flow.alpha == 0.5
    assert isinstance(resolve_flow("raft_flow:RaftFlow", {"min_reward": 0.3}), RaftFlow)


@pytest.mark.parametrize("spec, args, words", [
    ("no_such_module_xyz:Flow", None, "cannot import module 'no_such_module_xyz'"),
    (f"{__name__}:Missing", None, "has no attribute 'Missing'"),
    (f"{__name__}:ROOT", None, "is a str, not a Flow class"),
    (f"{__name__}:make_not_a_flow", None, "returned a NotAFlow, not an hpcalign.flows.Flow"),
    (f"{__name__}:NeedsCritic", None, "must name 'policy' and only models the trainer builds"),
    (f"{__name__}:Scaled", {"beta": 1}, "does not take these arguments"),
    ("not a path", None, "expected one of grpo, online_dpo, ppo"),
])
def test_bad_flows_are_named_errors(spec, args, words):
    with pytest.raises(UserError) as err:
        resolve_flow(spec, args)
    assert words in str(err.value), str(err.value)


def test_schedule_digest_follows_flow_models_and_placement():
    placement = {"world_size": 2, "trainer": {"ranks": 1}, "generator": {"ranks": 1}}
    grpo = schedule_digest(GRPOFlow(), placement)
    assert grpo == schedule_digest(GRPOFlow(), dict(placement))  # deterministic
    assert grpo != schedule_digest(OnlineDPOFlow(), placement)  # another flow
    assert grpo != schedule_digest(GRPOFlow(), {**placement, "world_size": 3})
    raft = schedule_digest(RaftFlow(), placement)
    assert raft != grpo and raft == schedule_digest(RaftFlow(min_reward=2.0), placement)
    # the schedule itself: GRPO's reference log-probs come before the policy's update
    ops = [(s.model, s.op) for s in GRPOFlow().schedule()]
    assert ops.index(("reference", "logprobs")) < ops.index(("policy", "train"))
    assert ("reference", "logprobs") not in [(s.model, s.op) for s in RaftFlow().schedule()]
    ppo = [(s.model, s.op) for s in PPOFlow().schedule()]
    assert ppo.index(("reward", "score")) < ppo.index(("policy", "train")) < \
        ppo.index(("value", "train")) < ppo.index(("policy", "weights"))


def test_check_schedule_names_the_rank():
    check_schedule("a" * 64, "a" * 64, "trainer 1 (world rank 1)")
    with pytest.raises(RuntimeError, match=r"generator 0 \(world rank 2\) derived another"):
        check_schedule("a" * 64, "b" * 64, "generator 0 (world rank 2)")


def _experience(rewards, groups):
    n = len(rewards)
    return Experience(step=0, rewards=torch.tensor(rewards, dtype=torch.float64),
                      group_ids=torch.tensor(groups), prompts=[np.arange(2)] * n,
                      completions=[np.arange(i + 1) for i in range(n)],
                      old_logprobs=[np.zeros(i + 1, np.float32) for i in range(n)])


def test_experience_select_keeps_every_field_in_order():
    exp = _experience([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1])
    picked = exp.select([3, 0])
    assert picked.rewards.tolist() == [0.4, 0.1] and picked.group_ids.tolist() == [1, 0]
    assert [len(c) for c in picked.completions] == [4, 1] and len(picked) == 2


def test_raft_keeps_each_groups_best_sample_above_the_threshold():
    """Against a loop: per group the first index of the maximum; NaN never wins; groups
    whose best is below min_reward are left out."""
    rewards = [0.2, 0.9, 0.9, float("nan"), 0.1, 0.3, float("nan"), float("nan")]
    groups = [5, 5, 5, 7, 7, 7, 9, 9]
    flow = RaftFlow(min_reward=0.25)
    expected = []
    for g in dict.fromkeys(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        valid = [i for i in rows if not np.isnan(rewards[i])]
        if valid:
            top = max(valid, key=lambda i: (rewards[i], -i))
            if rewards[top] >= 0.25:
                expected.append(top)
    assert flow.best_samples(_experience(rewards, groups)) == expected == [1, 5]
