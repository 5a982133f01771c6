"""The plan config: what `hpcalign plan` reads (`configs/plan-*.yaml`, or a study's `plan:`).

Every section refuses unknown keys. Layout degrees are *not* checked here: a study grid
produces impossible layouts on purpose, and the planner reports why each is infeasible
instead of refusing the file. Format: docs/planner.md, "Plan config".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from hpcalign.config.base import Section
from hpcalign.errors import ConfigError
from hpcalign.plan.hardware import HARDWARE
from hpcalign.plan.shapes import PRESETS, ModelShape, load_hf_config, preset


class CustomShape(Section):
    """A shape written out (tiny study models, or shapes with no config.json yet)."""

    layers: int = Field(..., ge=1)
    hidden: int = Field(..., ge=1)
    heads: int = Field(..., ge=1)
    kv_heads: int = Field(0, ge=0, description="0: same as heads (no GQA).")
    ffn: int = Field(..., ge=1, description="MLP intermediate size (SwiGLU).")
    vocab: int = Field(..., ge=1)
    tied_embeddings: bool = False
    qkv_bias: bool = False
    name: str = "custom"

    def to_shape(self) -> ModelShape:
        return ModelShape(
            self.name,
            self.layers,
            self.hidden,
            self.heads,
            self.kv_heads or self.heads,
            self.ffn,
            self.vocab,
            self.tied_embeddings,
            qkv_bias=self.qkv_bias,
        )


class ModelRef(Section):
    """A model by preset name, by an HF config.json (file or model dir), or written out."""

    preset: str | None = Field(None, description=f"One of: {', '.join(PRESETS)}.")
    hf_config: str | None = Field(None, description="Path to config.json or an HF model dir.")
    custom: CustomShape | None = Field(None, description="The shape written out.")

    @model_validator(mode="after")
    def _one(self) -> ModelRef:
        given = [k for k in ("preset", "hf_config", "custom") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of 'preset', 'hf_config' or 'custom' (got {given or 'none'})"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}; expected one of {', '.join(PRESETS)}")
        return self

    def shape(self, base_dir: Path | None = None) -> ModelShape:
        if self.preset is not None:
            return preset(self.preset)
        if self.custom is not None:
            return self.custom.to_shape()
        path = Path(self.hf_config or "")
        if base_dir is not None and not path.is_absolute() and not path.exists():
            path = base_dir / path
        return load_hf_config(path)


class Models(Section):
    """Policy (the reference has its shape) and reward model (the critic has its shape)."""

    policy: ModelRef
    reward: ModelRef | None = Field(None, description="Reward model and critic; PPO needs it.")


class Layout(Section):
    """Parallel degrees of one role; dp follows from the role's GPUs / (tp·pp)."""

    tp: int = Field(1, ge=1, description="Tensor parallel size.")
    pp: int = Field(1, ge=1, description="Pipeline parallel size.")
    vpp: int = Field(1, ge=1, description="Virtual pipeline stages per GPU (interleaved 1F1B).")


class Layouts(Section):
    """Per-role layouts. Roles on the train GPUs time-share them, each with its own degrees."""

    policy: Layout = Field(default_factory=Layout)
    reference: Layout | None = Field(None, description="Default: the policy's layout.")
    reward: Layout | None = Field(None, description="Default: the critic's, else the policy's.")
    critic: Layout | None = Field(None, description="Default: the policy's layout.")
    generator: Layout = Field(default_factory=Layout)


class Batch(Section):
    """One RL step: prompts × samples, each prompt_tokens + response_tokens long."""

    prompts: int = Field(512, ge=1, description="Prompts per step.")
    samples_per_prompt: int = Field(4, ge=1, description="Completions per prompt (GRPO group).")
    prompt_tokens: int = Field(1024, ge=1, description="Prompt length in tokens.")
    response_tokens: int = Field(1024, ge=1, description="Longest completion in tokens.")
    micro_batch: int = Field(1, ge=1, description="Sequences per micro-batch when training.")
    updates_per_step: int = Field(
        1, ge=1, description="Optimizer steps per RL step (PPO epochs × mini-batches)."
    )

    @property
    def samples(self) -> int:
        return self.prompts * self.samples_per_prompt

    @property
    def seq(self) -> int:
        return self.prompt_tokens + self.response_tokens


class Training(Section):
    """How trainable roles keep their state (Megatron's bf16 defaults)."""

    weight_bytes: float = Field(2, gt=0, description="Bytes per weight (bf16: 2, fp32: 4).")
    grad_bytes: float = Field(
        4, gt=0, description="Bytes per gradient (Megatron fp32 main grads: 4)."
    )
    optimizer_bytes: float = Field(12, ge=0, description="fp32 master + Adam m, v: 12.")
    distributed_optimizer: bool = Field(True, description="Shard optimizer state over DP (ZeRO-1).")
    recompute: Literal["none", "selective", "full"] = Field(
        "selective", description="Activation recomputation."
    )
    sequence_parallel: bool = Field(True, description="Megatron sequence parallelism with TP.")


class Generation(Section):
    """Generator engines (vLLM-like): memory they may take and cache block size."""

    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of GPU memory an engine takes."
    )
    workspace_gb: float = Field(
        2.0, ge=0, description="Activation/sampler workspace kept free of KV."
    )
    block_tokens: int = Field(16, ge=1, description="PagedAttention block size in tokens.")


class PlanConfig(Section):
    """A whole plan: model sizes, algorithm, GPUs, layouts, batch."""

    algorithm: Literal["grpo", "ppo", "dpo"] = Field("grpo", description="Roles follow from it.")
    hardware: str = Field("h100-80g", description=f"One of: {', '.join(HARDWARE)}.")
    gpus: int = Field(8, ge=1, description="GPUs in total.")
    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="Separate generator GPUs or shared."
    )
    generator_gpus: int = Field(
        0, ge=0, description="GPUs for generators when disaggregated (0: a quarter)."
    )
    staleness: int = Field(
        0, ge=0, description="Policy versions generation may run ahead (overlap when ≥ 1)."
    )
    models: Models
    layouts: Layouts = Field(default_factory=Layouts)
    batch: Batch = Field(default_factory=Batch)
    training: Training = Field(default_factory=Training)
    generation: Generation = Field(default_factory=Generation)

    @model_validator(mode="after")
    def _check(self) -> PlanConfig:
        if self.hardware.lower() not in HARDWARE:
            raise ValueError(f"hardware={self.hardware!r}; expected one of {', '.join(HARDWARE)}")
        if self.algorithm == "ppo" and self.models.reward is None:
            raise ValueError(
                "algorithm=ppo needs models.reward (the reward model and critic shape)"
            )
        return self

    @property
    def roles(self) -> list[str]:
        """Roles the algorithm runs, in the order of one step."""
        roles = {"grpo": ["generator", "reference", "policy"], "dpo": ["reference", "policy"]}
        if self.algorithm == "ppo":
            return ["generator", "reference", "reward", "critic", "policy"]
        if self.algorithm == "grpo" and self.models.reward is not None:
            return ["generator", "reference", "reward", "policy"]
        return roles[self.algorithm]

    def layout(self, role: str) -> Layout:
        got = getattr(self.layouts, role)
        if got is not None:
            return got
        if role == "reward" and self.layouts.critic is not None:
            return self.layouts.critic
        return self.layouts.policy


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `key: message (got value)`."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        msg = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            msg = "unknown key"
        got = problem.get("input")
        shown = "" if isinstance(got, dict) or problem["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{key}: {msg}{shown}")
    return f"{source}: " + "; ".join(lines)


def parse_plan(data: dict[str, Any], source: str) -> PlanConfig:
    try:
        return PlanConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, or a ConfigError naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def resolve_model_paths(data: dict[str, Any], base_dir: Path) -> None:
    """Make relative `models.*.hf_config` paths relative to the file that names them (when
    they do not exist relative to the working directory)."""
    models = data.get("models")
    if not isinstance(models, dict):
        return
    for ref in models.values():
        if isinstance(ref, dict) and isinstance(ref.get("hf_config"), str):
            path = Path(ref["hf_config"])
            if not path.is_absolute() and not path.exists() and (base_dir / path).exists():
                ref["hf_config"] = str((base_dir / path).resolve())


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """`data["a"]["b"] = value` for key "a.b", creating mappings on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value
