"""The config of an offline DPO run (`algorithm: dpo`): a policy, its frozen reference,
preference pairs, and the loss of TRL's DPOTrainer.

Its own root section, like `train-rm`'s: DPO has pairs instead of prompts with rewards
and no generator. `hpcalign run` picks it by the `algorithm` key and validates with the
same loader (errors name key, value and what was expected). `model.*` is the shorthand
for `models.policy.*`, as in every flow; the reference defaults to the policy's starting
weights.

    hpcalign run configs/dpo-tiny.yaml models.policy.path=DIR data.train=PAIRS.jsonl \\
        data.eval=EVAL.jsonl run_dir=RUN
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from hpcalign.config.base import Section
from hpcalign.config.reward_model import PairsConfig
from hpcalign.config.schema import CheckpointConfig, Device, DPOLossConfig, ModelConfig


class DPOModels(Section):
    """The named models of the DPO flow."""

    policy: ModelConfig
    reference: ModelConfig | None = Field(
        None, description="The frozen reference (null: the policy's starting weights).")


class DPOTrainerConfig(Section):
    """The optimisation loop: AdamW over batches of pairs."""

    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch: int = Field(32, ge=1, description="Pairs per step.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm (0: off).")
    eval_every_steps: int = Field(50, ge=0, description="Held-out evaluation period (0: only "
                                  "at the end).")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0: every core). Set "
                         "by the run, not inherited: a resume must compute with the same count.")
    device: Device = "auto"


class DPOConfig(Section):
    """An offline DPO run."""

    run_dir: str = Field(..., description="Run directory: checkpoints/, reference/ (the stored "
                         "reference log-probs), metrics.jsonl, config.yaml.")
    seed: int = Field(1234, description="Seed of the pair order.")
    algorithm: Literal["dpo"] = "dpo"
    models: DPOModels
    data: PairsConfig
    dpo: DPOLossConfig = Field(default_factory=DPOLossConfig)
    trainer: DPOTrainerConfig = Field(default_factory=DPOTrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="before")
    @classmethod
    def _model_shorthand(cls, data: Any) -> Any:
        """`model.*` is `models.policy.*` (the shorthand every flow keeps)."""
        if isinstance(data, dict) and "model" in data:
            data = dict(data)
            shorthand = data.pop("model")
            models = dict(data.get("models") or {})
            if "policy" in models:
                raise ValueError("model.* and models.policy.* both set the policy; use one")
            models["policy"] = shorthand
            data["models"] = models
        return data

    @model_validator(mode="after")
    def _given_models(self) -> DPOConfig:
        for name in ("policy", "reference"):
            model = getattr(self.models, name)
            if model is not None and model.init is not None:
                raise ValueError(f"models.{name}.init builds a new model; DPO starts from a given "
                                 f"one (models.{name}.path=DIR); set models.{name}.init=null")
        return self

    @property
    def reference(self) -> ModelConfig:
        return self.models.reference or self.models.policy
