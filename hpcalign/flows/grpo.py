"""GRPO and its family as a flow: advantages over prompt groups, clipped policy loss.

The trainer part of GRPO (DeepSeekMath) with the `trainer.*` options of
docs/user-guide.md "GRPO family": dynamic sampling drops groups without reward variance
(DAPO), `trainer.advantage_estimator` picks the estimator from
`hpcalign.algorithms.ADVANTAGE_ESTIMATORS` (GRPO, RLOO, REINFORCE++(-baseline)), the
reference's log-probs feed the KL term (in the loss or in the reward), and
`trainer.updates_per_batch` optimizer steps follow (roles/update.py).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcalign.algorithms.advantages import informative_groups
from hpcalign.flows.api import Experience, Flow, FlowResult
from hpcalign.roles.update import (
    logprob_mismatch_check,
    prepare_update,
    run_update,
    step_advantages,
)


class GRPOFlow(Flow):
    """`algorithm: grpo`: policy + frozen reference."""

    models = ("policy", "reference")

    def train(self, experience: Experience) -> FlowResult:
        ctx = self.ctx
        cfg, tcfg = ctx.cfg, ctx.cfg.trainer
        policy, reference = ctx.models["policy"], ctx.models["reference"]
        family: dict[str, float] = {}
        if tcfg.dynamic_sampling:  # DAPO; the generators refill with generator.refill_rounds
            informative = informative_groups(experience.rewards, experience.group_ids)
            family = {"groups_dropped": float(len(torch.unique(
                          experience.group_ids[~informative]))),
                      "samples_trained": float(informative.sum())}
            if not bool(informative.any()):
                return FlowResult.skipped(**family)
            experience = experience.select(torch.nonzero(informative).squeeze(-1).tolist())
        prompts, completions, old = (experience.prompts, experience.completions,
                                     experience.old_logprobs)
        lengths = np.array([len(c) for c in completions])
        token_count = float(max(1, lengths.sum()))
        mine = ctx.share(len(completions))
        temperature = cfg.generator.temperature
        prepared = prepare_update(policy, reference, [prompts[i] for i in mine],
                                  [completions[i] for i in mine], [old[i] for i in mine], tcfg,
                                  temperature=temperature)
        # unscorable samples (NaN: no reward function applied) get advantage 0
        advantages = step_advantages(tcfg, experience.rewards, experience.group_ids, lengths,
                                     prepared, mine, group=ctx.dp_group, ranks=ctx.dp_size)
        step = experience.step
        result = run_update(policy, prepared, advantages.to(policy.device), token_count,
                            tcfg, temperature=temperature, seq_count=float(len(completions)),
                            norm_length=float(cfg.generator.max_new_tokens),
                            after_backward=lambda: ctx.after_backward(step))
        logprob_mismatch_check(result.metrics, tcfg.max_logprob_mismatch, step,
                               group=ctx.trainer_group, ranks=ctx.trainer_ranks)
        return FlowResult(result, family)
