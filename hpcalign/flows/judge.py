"""A reward model as the judge of a step's samples (`models.reward`), for any flow.

PPO scores each sample with it; OnlineDPO prefers by it (TRL's OnlineDPOTrainer with a
`reward_model`). Without `models.reward` a flow keeps the shards' rewards, which the
reward functions gave on the generator ranks.

Placement (`models.reward.placement`): `colocated` loads the HF sequence-classification
checkpoint (`hpcalign train-rm`'s output, or any scalar-head reward model) on this trainer
rank, frozen; `exclusive` asks the model server on ranks of its own (roles/model_server.py),
whose client the trainer put in `ctx.models["reward"]`. Both score at the last real token
of prompt + completion (`models.reward_model.sequence_rewards`), so they agree bitwise.
"""

from __future__ import annotations

import torch

from hpcalign.flows.api import Experience, FlowContext


class RewardModelJudge:
    """Scores a step's samples with `models.reward` on the trainer rank or its server."""

    def __init__(self, ctx: FlowContext) -> None:
        from hpcalign.models.reward_model import load_reward_model

        self.ctx = ctx
        self.remote = ctx.models.get("reward")  # placement: exclusive
        self.model = None
        if self.remote is None:
            reward = ctx.cfg.models.reward
            self.model = load_reward_model(reward.path, reward.dtype,
                                           seed=ctx.cfg.seed).to(ctx.device).eval()
            self.model.requires_grad_(False)
            ctx.models["reward"] = self.model

    @classmethod
    def from_context(cls, ctx: FlowContext) -> RewardModelJudge | None:
        """The judge of this run's `models.reward`, or None when it names none."""
        return cls(ctx) if ctx.cfg.models.reward is not None else None

    def scores(self, experience: Experience) -> torch.Tensor:
        """[N] float32 on the CPU: each sample's (prompt + completion) score."""
        from hpcalign.models.reward_model import pack_right, sequence_rewards

        pad = self.ctx.models["policy"].pad_token_id
        sequences = [list(p) + list(c) for p, c in zip(experience.prompts,
                                                       experience.completions)]
        ids, mask = pack_right(sequences, pad, self.ctx.device)
        if self.remote is not None:
            return self.remote.score(ids, mask).cpu()
        with torch.no_grad():
            return sequence_rewards(self.model, ids, mask).cpu()


def judged_rewards(judge: RewardModelJudge | None, experience: Experience) -> torch.Tensor:
    """The judge's scores, else the shards' rewards (NaN where no function applied)."""
    return experience.rewards if judge is None else judge.scores(experience)
