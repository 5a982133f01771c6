"""OnlineDPO as a flow: (best, worst) pairs of each sampled group and a DPO step.

The environment part is GRPO's (the generators sample `samples_per_prompt` >= 2
completions of each prompt with the current policy and score them with the reward
functions); the trainer part judges them — by those rewards, or by a reward model when
`models.reward` names one (flows/judge.py: on the trainer rank, or on ranks of its own
with `placement: exclusive`) — pairs each group's best and worst sample and takes a DPO
step against the frozen reference (roles/online_dpo.py; Guo et al. 2024, TRL's
OnlineDPOTrainer with a `reward_model` or `reward_funcs`).
"""

from __future__ import annotations

import torch

from hpcalign.engines import TrainStepResult
from hpcalign.flows.api import TRAINER, Experience, Flow, FlowContext, FlowResult, Step


class OnlineDPOFlow(Flow):
    """`algorithm: online_dpo`: policy + frozen reference, the `dpo.*` loss; the judge is
    the reward functions or `models.reward`."""

    models = ("policy", "reference")

    def setup(self, ctx: FlowContext) -> None:
        from hpcalign.flows.judge import RewardModelJudge

        super().setup(ctx)
        self.judge = RewardModelJudge.from_context(ctx)

    def schedule(self) -> tuple[Step, ...]:
        base = list(super().schedule())
        at = next(i for i, s in enumerate(base) if s.model == "policy" and s.op == "train")
        return (*base[:at], Step(TRAINER, "reward", "score", "trainers"), *base[at:])

    def train(self, experience: Experience) -> FlowResult:
        from hpcalign.flows.judge import judged_rewards
        from hpcalign.roles.online_dpo import online_dpo_update, preference_pairs

        ctx, dcfg = self.ctx, self.ctx.cfg.dpo
        scores = judged_rewards(self.judge, experience)
        pairs = preference_pairs(scores, experience.group_ids)
        family = {"pairs": float(len(pairs)),
                  "groups_without_preference": float(
                      len(torch.unique(experience.group_ids)) - len(pairs))}
        if self.judge is not None:  # the samples' reward-model scores (reward_mean: functions')
            family["score_mean"] = float(scores.float().mean())
        if not pairs:  # every group scored all its samples the same: nothing to prefer
            return FlowResult.skipped(**family)
        mine = [pairs[i] for i in ctx.share(len(pairs))]
        result = online_dpo_update(ctx.models["policy"], ctx.models["reference"],
                                   experience.prompts, experience.completions, mine, len(pairs),
                                   beta=dcfg.beta, loss_type=dcfg.loss_type,
                                   label_smoothing=dcfg.label_smoothing,
                                   temperature=ctx.cfg.generator.temperature)
        metrics = dict(result.metrics)
        metrics.pop("pairs", None)
        return FlowResult(TrainStepResult(metrics=metrics, grad_norm=result.grad_norm), family)


