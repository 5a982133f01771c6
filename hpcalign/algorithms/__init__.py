"""Alignment algorithms as documented pure torch functions (shapes and masks in each module).

    from hpcalign.algorithms import ADVANTAGE_ESTIMATORS, policy_loss, dpo_loss

- `advantages`: group_advantages (GRPO, Dr. GRPO), rloo_advantages, reinforce_pp_advantages,
  reinforce_pp_baseline_advantages, gae, whiten, informative_groups (dynamic sampling), and
  the `ADVANTAGE_ESTIMATORS` registry;
- `losses`: policy_loss (clip low/high, aggregations, GSPO's sequence ratio), value_loss,
  kl_estimate (k1/k2/k3), aggregate, sft_loss;
- `dpo`: dpo_loss (sigmoid, ipo, hinge, robust) and dpo_implicit_rewards;
- `grpo`: grpo_loss, the GRPO defaults of policy_loss.
"""

from hpcalign.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae,
    group_advantages,
    informative_groups,
    register_advantage_estimator,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    whiten,
)
from hpcalign.algorithms.dpo import DPO_LOSS_TYPES, dpo_implicit_rewards, dpo_loss
from hpcalign.algorithms.grpo import grpo_loss
from hpcalign.algorithms.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    kl_estimate,
    kl_k3,
    policy_loss,
    sft_loss,
    value_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGGREGATIONS", "DPO_LOSS_TYPES", "KL_ESTIMATORS", "aggregate",
    "dpo_implicit_rewards", "dpo_loss", "gae", "group_advantages", "grpo_loss",
    "informative_groups", "kl_estimate", "kl_k3", "policy_loss", "register_advantage_estimator", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages", "rloo_advantages", "sft_loss", "value_loss", "whiten",
]
