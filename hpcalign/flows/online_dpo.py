"""OnlineDPO as a flow: (best, worst) pairs of each sampled group and a DPO step.

The environment part is GRPO's (the generators sample `samples_per_prompt` >= 2
completions of each prompt with the current policy and score them); the trainer part pairs
each group's best and worst sample and takes a DPO step against the frozen reference
(roles/online_dpo.py; Guo et al. 2024, TRL's OnlineDPOTrainer).
"""

from __future__ import annotations

import torch

from hpcalign.engines import TrainStepResult
from hpcalign.flows.api import Experience, Flow, FlowResult


class OnlineDPOFlow(Flow):
    """`algorithm: online_dpo`: policy + frozen reference, the `dpo.*` loss."""

    models = ("policy", "reference")

    def train(self, experience: Experience) -> FlowResult:
        from hpcalign.roles.online_dpo import online_dpo_update, preference_pairs

        ctx, dcfg = self.ctx, self.ctx.cfg.dpo
        pairs = preference_pairs(experience.rewards, experience.group_ids)
        family = {"pairs": float(len(pairs)),
                  "groups_without_preference": float(
                      len(torch.unique(experience.group_ids)) - len(pairs))}
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


