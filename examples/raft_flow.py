"""A user-defined flow: RAFT, reward-ranked fine-tuning (Dong et al. 2023).

Each step the generators sample `generator.samples_per_prompt` completions of every prompt
with the current policy and score them (the environment part, as for GRPO); this flow, the
trainer part, keeps the best-scoring completion of each prompt and takes one supervised
step on those (mean token negative log-likelihood). No reference model, no advantages:
the flow names only the policy, so the trainer builds nothing else.

Run it on the quickstart's task, with this directory on PYTHONPATH:

    PYTHONPATH=examples hpcalign run configs/quickstart.yaml algorithm=raft_flow:RaftFlow \\
        flow.min_reward=0.5 run_dir=/tmp/raft

`flow.*` keys are the keyword arguments of `RaftFlow(...)`. The same line works with
`hpcalign submit` (srun passes PYTHONPATH on to the ranks).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcalign.flows import Experience, Flow, FlowResult


class RaftFlow(Flow):
    """Supervised steps on each prompt's best sample."""

    models = ("policy",)

    def __init__(self, min_reward: float = 0.0) -> None:
        self.min_reward = float(min_reward)  # a best sample scoring less teaches nothing

    def best_samples(self, experience: Experience) -> list[int]:
        """Index of each group's highest reward (the first on ties), if >= min_reward."""
        rewards = torch.nan_to_num(experience.rewards.double(), nan=float("-inf"))
        best = []
        for group in torch.unique(experience.group_ids).tolist():
            rows = torch.nonzero(experience.group_ids == group).squeeze(-1)
            top = int(rows[int(torch.argmax(rewards[rows]))])
            if float(rewards[top]) >= self.min_reward:
                best.append(top)
        return best

    def train(self, experience: Experience) -> FlowResult:
        policy = self.ctx.models["policy"]
        best = self.best_samples(experience)
        if not best:
            return FlowResult.skipped(raft_samples=0.0)
        tokens = float(sum(len(experience.completions[i]) for i in best))  # whole step
        mine = [best[i] for i in self.ctx.share(len(best))]
        weight = 1.0
        if not mine:  # this replica still joins the step's gradient all-reduce
            mine, weight = best[:1], 0.0
        batch = policy.pack([experience.prompts[i] for i in mine],
                            [experience.completions[i] for i in mine])

        def nll(_index, packed, logp, _entropy):
            mask = packed["completion_mask"]
            total = -(logp * mask).sum() * weight
            return total / tokens, {"nll": float(total.detach()) / tokens}

        result = policy.train_step([batch], nll, temperature=1.0)
        best_rewards = experience.rewards[best].double()
        return FlowResult(result, {"raft_samples": float(len(best)),
                                   "raft_best_reward_mean": float(np.mean(best_rewards.numpy()))})
