"""Reward functions with TRL's signature: built-ins by short name, a user's own by import path.

`load_reward_functions(["math_verify", "my_rewards:brevity"], weights)` gives a `RewardSet`
whose `score` calls each function as TRL's GRPOTrainer does (see `functions.py`).
"""

from hpcalign.rewards.builtin import (
    REWARDS,
    exact_match,
    format_reward,
    format_reward_for,
    math_verify,
)
from hpcalign.rewards.functions import (
    RewardError,
    RewardFunction,
    RewardSet,
    TrainerState,
    load_reward_functions,
)

__all__ = [
    "REWARDS",
    "RewardError",
    "RewardFunction",
    "RewardSet",
    "TrainerState",
    "exact_match",
    "format_reward",
    "format_reward_for",
    "load_reward_functions",
    "math_verify",
]
