"""What `hpcalign plan CONFIG` accepts: a plan config, a study, or an hpcalign run config.

The kind is told by the top-level keys: `grid`/`plan` → study, `run_dir` + `model` → run
config (planned as the GRPO run it describes), anything else → plan config. `key=value`
overrides apply to the file before it is checked, as for every hpcalign command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from hpcalign.errors import ConfigError
from hpcalign.plan.spec import PlanConfig, parse_plan, read_yaml, resolve_model_paths, set_dotted
from hpcalign.plan.study import Study, load_study


def kind_of(data: dict[str, Any]) -> str:
    if "plan" in data or "grid" in data:
        return "study"
    if "run_dir" in data and "model" in data:
        return "run"
    return "plan"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. gpus=1024)")
        set_dotted(data, key, yaml.safe_load(raw))


def plan_from_run_config(path: str, overrides: list[str], hardware: str | None) -> PlanConfig:
    """The plan of the GRPO run a run config describes (data-parallel trainer ranks,
    one generator engine per generator rank, TP = PP = 1, the run's dtype)."""
    from hpcalign.config.load import load_config

    cfg = load_config(path, overrides)
    model_dir = Path(cfg.model.path)
    if (model_dir / "config.json").exists():
        policy: dict[str, Any] = {"hf_config": str(model_dir)}
    elif cfg.model.init is not None:
        init = cfg.model.init
        # NOTE: the char tokenizer of init-model has 44 symbols (hpcalign/models/tiny.py)
        policy = {
            "custom": {
                "layers": init.layers,
                "hidden": init.hidden,
                "heads": init.heads,
                "kv_heads": init.kv_heads,
                "ffn": init.intermediate,
                "vocab": 44,
                "tied_embeddings": init.tie_embeddings,
                "qkv_bias": init.arch == "qwen2",
                "name": f"{init.arch}-tiny",
            }
        }
    else:
        raise ConfigError(
            f"{path}: model.path={cfg.model.path!r} has no config.json and model.init is unset"
        )
    fp32 = cfg.model.dtype == "float32"
    on_gpu = cfg.slurm.train.gpus_per_node > 0
    samples = cfg.generator.prompts_per_step * cfg.generator.samples_per_prompt
    data = {
        "algorithm": "grpo",
        "hardware": hardware or ("h100-80g" if on_gpu else "cpu"),
        "gpus": cfg.trainer.ranks + cfg.generator.ranks,
        "mode": "disaggregated",
        "generator_gpus": cfg.generator.ranks,
        "staleness": cfg.sync.max_staleness,
        "models": {"policy": policy},
        "batch": {
            "prompts": cfg.generator.prompts_per_step,
            "samples_per_prompt": cfg.generator.samples_per_prompt,
            # NOTE: a dataset's prompts are bounded by data.max_prompt_tokens (else 512, a
            # guess); a built-in task's are its longest problem plus a short template
            "prompt_tokens": (cfg.data.max_prompt_tokens or 512) if cfg.task is None
            else cfg.task.max_len + 8,
            "response_tokens": cfg.generator.max_new_tokens,
            "micro_batch": cfg.trainer.micro_batch or max(1, samples // cfg.trainer.ranks),
        },
        # torch AdamW: fp32 weights, grads, m, v (no master copy); bf16 with fp32 master
        "training": {
            "weight_bytes": 4 if fp32 else 2,
            "grad_bytes": 4 if fp32 else 2,
            "optimizer_bytes": 8 if fp32 else 12,
            "distributed_optimizer": False,
            "recompute": "none",
            "sequence_parallel": False,
        },
    }
    return parse_plan(data, path)


def load_input(
    path: str, overrides: list[str], hardware: str | None = None
) -> tuple[str, PlanConfig | Study]:
    """(kind, parsed) for `hpcalign plan`'s CONFIG argument."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file")
    data = read_yaml(path)
    kind = kind_of(data)
    if kind == "study":
        return kind, load_study(path, overrides)
    if kind == "run":
        return kind, plan_from_run_config(path, overrides, hardware)
    apply_overrides(data, overrides)
    resolve_model_paths(data, Path(path).parent)
    if hardware:
        data["hardware"] = hardware
    return kind, parse_plan(data, path)
