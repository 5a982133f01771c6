"""The config of `hpcalign train-rm`: a reward model trained on preference pairs.

Its own root section (not a run's `Config`): a reward model has a dataset of pairs, not
prompts with reward functions, and no generator. It is loaded and checked by the same
`config.load.load_config` (YAML + `key=value` overrides, errors naming key, value and what
was expected), and `model.*` keeps the meaning it has everywhere: the model being trained.

    hpcalign train-rm configs/rm-tiny.yaml model.path=BASE data.train=PAIRS.jsonl \\
        data.eval=EVAL.jsonl run_dir=RM
"""

from __future__ import annotations

from pydantic import Field, model_validator

from hpcalign.config.base import Section
from hpcalign.config.schema import Device, ModelConfig


class PairsConfig(Section):
    """Preference pairs in TRL's format (data/preferences.py)."""

    train: str = Field(..., description="Training pairs: .jsonl/.json, .parquet or a "
                       "save_to_disk directory with prompt, chosen, rejected (optional margin).")
    eval: str | None = Field(None, description="Held-out pairs: accuracy and margin are "
                             "reported on them (null: none).")
    max_tokens: int | None = Field(
        None, ge=2, description="Longest prompt + completion in tokens; longer pairs are "
        "skipped and counted (null: no limit).")


class RewardTrainerConfig(Section):
    """The Bradley-Terry training loop: AdamW over batches of pairs."""

    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch: int = Field(32, ge=1, description="Pairs per step (each pair: two sequences).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm (0: off).")
    use_margin: bool = Field(
        True, description="Subtract the dataset's `margin` column inside the loss "
        "(Llama 2's margin loss, as TRL's RewardTrainer does); rows without one: 0.")
    eval_every_steps: int = Field(50, ge=0, description="Held-out evaluation period "
                                  "(0: only at the end).")
    device: Device = "auto"


class RewardModelConfig(Section):
    """`hpcalign train-rm`: the model, the pairs, the loop, and where the result goes."""

    run_dir: str = Field(..., description="Output directory: model/ (the HF checkpoint), "
                         "metrics.jsonl, config.yaml.")
    seed: int = Field(1234, description="Seed of the new score head and the pair order.")
    model: ModelConfig
    data: PairsConfig
    trainer: RewardTrainerConfig = Field(default_factory=RewardTrainerConfig)

    @model_validator(mode="after")
    def _a_given_model(self) -> RewardModelConfig:
        if self.model.init is not None:
            raise ValueError("model.init builds a new policy model; train-rm starts from a "
                             "given one (model.path=DIR); set model.init=null")
        return self
