"""Training and generation engines, registered by name (`trainer.backend`, `generator.backend`).

The interfaces are in `engines/base.py`; the roles call nothing else of a model backend.
Registries are plain dicts of name -> "module:class" (imported on first use, so reading a
config never imports torch); megatron-core and vLLM engines register here when they exist.

    engine = build_training_engine("torch", model_dir, cfg, device=dev, optimizer=spec)
    sampler = build_generation_engine("torch", model_dir, cfg, device=dev)
"""

from __future__ import annotations

import importlib
from typing import Any

from hpcalign.engines.base import (
    GenerationEngine,
    GenerationOutput,
    LossFn,
    OptimizerSpec,
    SamplingParams,
    TrainingEngine,
    TrainStepResult,
)

TRAINING_ENGINES: dict[str, str] = {
    "torch": "hpcalign.engines.torch_training:TorchTrainingEngine",
    "megatron": "hpcalign.engines.megatron.engine:MegatronTrainingEngine",
}
GENERATION_ENGINES: dict[str, str] = {
    "torch": "hpcalign.engines.torch_generation:TorchGenerationEngine",
    "vllm": "hpcalign.engines.vllm_generation:VllmGenerationEngine",
}

__all__ = [
    "GENERATION_ENGINES",
    "TRAINING_ENGINES",
    "GenerationEngine",
    "GenerationOutput",
    "LossFn",
    "OptimizerSpec",
    "SamplingParams",
    "TrainStepResult",
    "TrainingEngine",
    "build_generation_engine",
    "build_training_engine",
]


def _engine_class(registry: dict[str, str], name: str, what: str) -> Any:
    if name not in registry:
        raise ValueError(f"{what} engine '{name}' is not one of: {', '.join(registry)}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_training_engine(name: str, model_dir: str, cfg: Any, **kwargs: Any) -> TrainingEngine:
    """The training engine `name` over the HF directory `model_dir` (kwargs: the engine's)."""
    return _engine_class(TRAINING_ENGINES, name, "training").build(model_dir, cfg, **kwargs)


def build_generation_engine(name: str, model_dir: str, cfg: Any, **kwargs: Any) -> GenerationEngine:
    """The generation engine `name` over the HF directory `model_dir` (kwargs: the engine's)."""
    return _engine_class(GENERATION_ENGINES, name, "generation").build(model_dir, cfg, **kwargs)
