"""The trainer's models beyond the policy and its reference, and the updates that use them.

GRPO needs a policy and a frozen reference; the other online flows add models and change
the update the trainer takes from a step's shards (the generators, shards and weight sync
stay the same):

- `online_dpo`: (best, worst) pairs of each sampled group and a DPO step
  (`roles/online_dpo.py`);
- `ppo`: a frozen reward model (`models.reward`, an HF sequence-classification
  checkpoint such as `hpcalign train-rm` writes; without one, the shards' rewards from
  the reward functions) and a trainable critic (`models.value`, default: the reward
  model, else the policy, with a new head), and PPO's epochs (`roles/ppo.py`).

Colocated placement: these models live on the trainer ranks beside the policy and run
in turn. Their state goes into the policy's checkpoint (`models/value/` in the same
directory, one atomic rename), so resume is bitwise as for GRPO.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from hpcalign.engines import OptimizerSpec, TrainStepResult


class FlowModels:
    """What `cfg.algorithm` adds to the trainer (nothing for GRPO)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.critic = None
        self.reward_model = None
        if self.cfg.algorithm != "ppo":
            return
        from hpcalign.engines.torch_value import TorchValueEngine
        from hpcalign.models.reward_model import load_reward_model

        models, pcfg = self.cfg.models, self.cfg.ppo
        device = trainer.ctx.device
        if models.reward is not None:
            self.reward_model = load_reward_model(models.reward.path, models.reward.dtype,
                                                  seed=self.cfg.seed).to(device).eval()
            self.reward_model.requires_grad_(False)
        value = models.value or models.reward
        value_dir = value.path if value is not None else trainer.reference_dir
        self.critic = TorchValueEngine.build(
            value_dir, device=device, dtype=value.dtype if value is not None else "float32",
            seed=self.cfg.seed, optimizer=OptimizerSpec(lr=pcfg.value_lr,
                                                        grad_clip=self.cfg.trainer.grad_clip))

    # ---------------------------------------------------------------- checkpoints
    def save_extra(self, directory: str) -> None:
        if self.critic is not None:
            self.critic.save_state(os.path.join(directory, "models", "value"))

    def restore(self, checkpoint: str) -> None:
        if self.critic is not None:
            self.critic.load_state(os.path.join(checkpoint, "models", "value"))

    # ---------------------------------------------------------------- updates
    def update(self, step: int, rewards: torch.Tensor, group_ids: torch.Tensor,
               prompts: list[np.ndarray], completions: list[np.ndarray],
               old: list[np.ndarray]) -> tuple[TrainStepResult, dict[str, float]]:
        if self.cfg.algorithm == "online_dpo":
            return self._online_dpo(rewards, group_ids, prompts, completions)
        return self._ppo(step, rewards, prompts, completions, old)

    def _online_dpo(self, rewards, group_ids, prompts, completions):
        from hpcalign.roles.online_dpo import online_dpo_update, preference_pairs

        trainer, dcfg = self.trainer, self.cfg.dpo
        pairs = preference_pairs(rewards, group_ids)
        family = {"pairs": float(len(pairs)),
                  "groups_without_preference": float(len(torch.unique(group_ids)) - len(pairs))}
        if not pairs:  # every group scored all its samples the same: nothing to prefer
            return TrainStepResult(metrics={"kl": math.nan}, grad_norm=math.nan), family
        ranks = trainer.ctx.placement.trainer.ranks
        mine = [pairs[i] for i in np.array_split(np.arange(len(pairs)), ranks)[trainer.index]]
        result = online_dpo_update(trainer.policy, trainer.reference, prompts, completions, mine,
                                   len(pairs), beta=dcfg.beta, loss_type=dcfg.loss_type,
                                   label_smoothing=dcfg.label_smoothing,
                                   temperature=self.cfg.generator.temperature)
        metrics = dict(result.metrics)
        metrics.pop("pairs", None)
        return TrainStepResult(metrics=metrics, grad_norm=result.grad_norm), family

    def _scores(self, rewards, prompts, completions) -> torch.Tensor:
        """The reward model's score of each sample, else the shards' reward (NaN: 0)."""
        if self.reward_model is None:
            return torch.nan_to_num(rewards.float(), nan=0.0)
        from hpcalign.models.reward_model import pack_right, sequence_rewards

        pad = self.trainer.policy.pad_token_id
        sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
        ids, mask = pack_right(sequences, pad, self.trainer.ctx.device)
        with torch.no_grad():
            return sequence_rewards(self.reward_model, ids, mask).cpu()

    def _ppo(self, step, rewards, prompts, completions, old):
        from hpcalign.roles.ppo import PPOSettings, ppo_update

        pcfg = self.cfg.ppo
        scores = self._scores(rewards, prompts, completions)
        if pcfg.missing_eos_penalty:
            eos = set(self.trainer.policy.eos_token_ids)
            unfinished = torch.tensor([not (len(c) and int(c[-1]) in eos) for c in completions])
            scores = scores - pcfg.missing_eos_penalty * unfinished.float()
        settings = PPOSettings(kl_coef=pcfg.kl_coef, gamma=pcfg.gamma, lam=pcfg.lam,
                               clip_eps=self.cfg.trainer.clip_eps,
                               value_clip_eps=pcfg.value_clip_eps, epochs=pcfg.epochs,
                               minibatches=pcfg.minibatches,
                               whiten_advantages=pcfg.whiten_advantages, seed=self.cfg.seed)
        metrics = ppo_update(self.trainer.policy, self.trainer.reference, self.critic, prompts,
                             completions, old, scores, settings,
                             temperature=self.cfg.generator.temperature, step=step)
        return TrainStepResult(metrics=metrics, grad_norm=math.nan), {}
