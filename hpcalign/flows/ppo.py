"""RLHF-PPO as a flow over four named models: policy, reference, reward and value.

The environment part samples with the policy's generation engine; the trainer part scores
each sample with the reward model (`models.reward`, an HF sequence-classification
checkpoint such as `hpcalign train-rm` writes; without one, the shards' rewards from the
reward functions), shapes per-token rewards with the KL to the reference, estimates
values with the critic (`models.value`, default: the reward model, else the policy, with
a new head), and takes PPO's epochs over mini-batches (roles/ppo.py).

Placement: colocated — the reward model and the critic live on the trainer rank beside
the policy and run in turn (or the reward model and the reference on ranks of their own:
`placement: exclusive`). Data parallel (`trainer.ranks > 1`): every trainer rank holds the
policy, the critic and the colocated models, scores and updates its share of the batch,
and the engines sum gradients over the ranks (roles/ppo.py `Replicas`). The critic's
state goes into the policy's checkpoint (`models/value/` in the same directory, one
atomic rename), and so does the KL coefficient (`ppo.kl_ctrl.type: adaptive` moves it
after every batch), so resume is bitwise.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from hpcalign.algorithms.kl_control import kl_controller
from hpcalign.engines import OptimizerSpec, TrainStepResult
from hpcalign.flows.api import TRAINER, Experience, Flow, FlowContext, FlowResult, Step

KL_STATE = "ppo_kl.json"  # the adaptive KL coefficient, in the policy's checkpoint


class PPOFlow(Flow):
    """`algorithm: ppo`: the `ppo.*` keys, `models.reward`, `models.value`."""

    models = ("policy", "reference")  # built by the trainer; reward and value: setup()
    has_state = True

    def setup(self, ctx: FlowContext) -> None:
        from hpcalign.engines.torch_value import TorchValueEngine
        from hpcalign.flows.judge import RewardModelJudge

        super().setup(ctx)
        cfg = ctx.cfg
        models, pcfg = cfg.models, cfg.ppo
        self.judge = RewardModelJudge.from_context(ctx)
        value = models.value or models.reward
        value_dir = value.path if value is not None else ctx.reference_dir
        self.critic = TorchValueEngine.build(
            value_dir, device=ctx.device, dtype=value.dtype if value is not None else "float32",
            seed=cfg.seed, optimizer=OptimizerSpec(lr=pcfg.value_lr,
                                                   grad_clip=cfg.trainer.grad_clip),
            dp_group=ctx.dp_group, dp_size=ctx.dp_size)
        ctx.models["value"] = self.critic
        self.kl_ctl = kl_controller(pcfg.kl_ctrl.type, kl_coef=pcfg.kl_coef,
                                    target_kl=pcfg.kl_ctrl.target_kl,
                                    horizon=pcfg.kl_ctrl.horizon)

    def schedule(self) -> tuple[Step, ...]:
        base = list(super().schedule())
        extra = [Step(TRAINER, "reward", "score", "trainers"),
                 Step(TRAINER, "value", "values", "trainers"),
                 Step(TRAINER, "value", "train", "trainers")]
        at = next(i for i, s in enumerate(base) if s.model == "policy" and s.op == "train")
        return (*base[:at], *extra[:2], base[at], extra[2], *base[at + 1:])

    def save(self, directory: str) -> None:
        self.critic.save_state(os.path.join(directory, "models", "value"))
        with open(os.path.join(directory, KL_STATE), "w") as handle:
            json.dump({"kl_coef": self.kl_ctl.value}, handle)  # repr: exact round trip

    def restore(self, directory: str) -> None:
        self.critic.load_state(os.path.join(directory, "models", "value"))
        path = os.path.join(directory, KL_STATE)
        if os.path.exists(path):  # checkpoints from before the adaptive coefficient: fixed
            with open(path) as handle:
                self.kl_ctl.value = float(json.load(handle)["kl_coef"])

    def _scores(self, experience: Experience) -> torch.Tensor:
        """The reward model's score of each sample, else the shards' reward (NaN: 0)."""
        from hpcalign.flows.judge import judged_rewards

        return torch.nan_to_num(judged_rewards(self.judge, experience).float(), nan=0.0)

    def train(self, experience: Experience) -> FlowResult:
        from hpcalign.roles.ppo import PPOSettings, Replicas, ppo_update

        ctx = self.ctx
        cfg, policy = ctx.cfg, ctx.models["policy"]
        pcfg = cfg.ppo
        n = len(experience)
        shares = tuple(np.array_split(np.arange(n), ctx.dp_size))
        replicas = Replicas(shares, ctx.dp_index, ctx.dp_group if ctx.dp_size > 1 else None)
        experience = experience.select(shares[ctx.dp_index].tolist())  # this replica's
        scores = self._scores(experience)
        if pcfg.missing_eos_penalty:
            eos = set(policy.eos_token_ids)
            unfinished = torch.tensor([not (len(c) and int(c[-1]) in eos)
                                       for c in experience.completions])
            scores = scores - pcfg.missing_eos_penalty * unfinished.float()
        settings = PPOSettings(kl_coef=self.kl_ctl.value, gamma=pcfg.gamma, lam=pcfg.lam,
                               clip_eps=cfg.trainer.clip_eps,
                               value_clip_eps=pcfg.value_clip_eps, epochs=pcfg.epochs,
                               minibatches=pcfg.minibatches,
                               whiten_advantages=pcfg.whiten_advantages, seed=cfg.seed)
        metrics = ppo_update(policy, self.ctx.models["reference"], self.critic,
                             experience.prompts, experience.completions,
                             experience.old_logprobs, scores, settings,
                             temperature=cfg.generator.temperature, step=experience.step,
                             replicas=replicas)
        metrics["kl_coef"] = settings.kl_coef  # the one this batch was shaped with
        self.kl_ctl.update(metrics["kl_sample_mean"], n)  # the whole batch's: same everywhere
        return FlowResult(TrainStepResult(metrics=metrics, grad_norm=math.nan))
