"""A scaling study: a base plan, a grid over its keys, and how to measure the small points.

```yaml
name: study-tiny
plan: {...}                      # a plan config (docs/planner.md, "Plan config")
grid:                            # dotted plan keys -> values; the cartesian product
  gpus: [2, 3]
  staleness: [0, 1]
measure:                         # optional: which points run for real, and how
  run_config: configs/quickstart.yaml
  steps: 4
```
Every grid point is validated like a plan file (a wrong key or value names the point);
layouts that cannot work are not errors here, the planner prunes them with a reason.
Which points are measurable, and the `hpcalign run` overrides of each, are decided here.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from hpcalign.config.base import Section
from hpcalign.errors import ConfigError
from hpcalign.plan.planner import pools_of
from hpcalign.plan.shapes import count_params
from hpcalign.plan.spec import (
    PlanConfig,
    format_validation_error,
    parse_plan,
    read_yaml,
    resolve_model_paths,
    set_dotted,
)


class Measure(Section):
    """How measurable points run: `hpcalign run RUN_CONFIG overrides` as one array task each."""

    run_config: str = Field(
        ..., description="hpcalign run config every measured point starts from."
    )
    steps: int = Field(
        4, ge=2, description="Steps per measured run (the first is warm-up, not timed)."
    )
    executor: Literal["auto", "slurm", "local", "debug"] = Field(
        "auto",
        description="submitit executor: auto (Slurm when sbatch exists), slurm, local, debug.",
    )
    partition: str = Field("train", description="Slurm partition of the job array.")
    cpus_per_task: int = Field(2, ge=1, description="CPUs per array task.")
    timeout_min: int = Field(20, ge=1, description="Time limit of each array task.")
    parallelism: int = Field(2, ge=1, description="Array tasks running at once.")
    max_params: float = Field(
        1e8, gt=0, description="Points whose policy is larger are planned only."
    )
    overrides: list[str] = Field(default_factory=list, description="Extra key=value for every run.")
    wait_s: float = Field(1800, gt=0, description="Longest wait for the array before reporting.")


class Study(Section):
    """The study file `hpcalign sweep` and `hpcalign plan` read."""

    name: str = Field(..., description="Study name; the default output dir is runs/studies/NAME.")
    plan: dict[str, Any] = Field(..., description="The base plan config.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Plan key -> values.")
    measure: Measure | None = Field(None, description="Run the measurable points (else plan only).")

    @field_validator("grid")
    @classmethod
    def _nonempty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} is empty; give at least one value")
        return grid


@dataclass
class Point:
    """One grid point: its index, the grid values that define it, and its plan config."""

    index: int
    values: dict[str, Any]
    config: PlanConfig

    @property
    def label(self) -> str:
        """Short `key=value` list: last key segment, role prefix for non-policy layouts."""
        parts = []
        for key, value in self.values.items():
            bits = key.split(".")
            name = bits[-1]
            if bits[0] == "layouts" and len(bits) == 3 and bits[1] != "policy":
                name = f"{bits[1][:3]}.{name}"
            parts.append(
                f"{name}={value if not isinstance(value, dict) else '/'.join(map(str, value.values()))}"
            )
        return " ".join(parts) or "base"


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read and check a study file; `overrides` are `key=value` on the study itself."""
    data = read_yaml(path)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. plan.gpus=1024)"
            )
        set_dotted(data, key, yaml.safe_load(raw))
    if isinstance(data.get("plan"), dict):
        resolve_model_paths(data["plan"], Path(path).parent)
    try:
        study = Study.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    points(study, source=str(path))  # every point must be a valid plan config
    return study


def points(study: Study, source: str = "study") -> list[Point]:
    """The cartesian product of the grid, each a checked PlanConfig."""
    keys = list(study.grid)
    out = []
    for index, combo in enumerate(itertools.product(*(study.grid[k] for k in keys))):
        data = copy.deepcopy(study.plan)
        values = dict(zip(keys, combo))
        for key, value in values.items():
            set_dotted(data, key, value)
        where = f"{source}: grid point {index} ({', '.join(f'{k}={v}' for k, v in values.items())})"
        out.append(Point(index, values, parse_plan(data, where if values else f"{source}: plan")))
    return out


def measure_reason(study: Study, point: Point, feasible: bool) -> str | None:
    """Why `point` is planned only (None: it is measured).

    `hpcalign run` trains with data parallelism only (torch backend, no TP/PP keys in the
    run config), runs GRPO, and keeps trainers and generators in separate ranks, so only
    points of that shape can be measured; a large policy is never run on this machine.
    """
    cfg = point.config
    if study.measure is None:
        return "study has no measure section"
    if not feasible:
        return "infeasible plan"
    if cfg.algorithm != "grpo":
        return f"algorithm {cfg.algorithm}: hpcalign run has grpo only"
    if cfg.mode != "disaggregated":
        return "colocated: hpcalign run keeps trainers and generators in separate ranks"
    params = count_params(cfg.models.policy.shape()).total
    if params > study.measure.max_params:
        return f"policy has {params / 1e9:.2f} B parameters > measure.max_params {study.measure.max_params:.3g}"
    pol, gen = cfg.layout("policy"), cfg.layouts.generator
    if (pol.tp, pol.pp, gen.tp, gen.pp) != (1, 1, 1, 1):
        return "TP/PP > 1: the run config's trainer and generator are data parallel only"
    return None


def run_overrides(study: Study, point: Point, run_dir: str) -> list[str]:
    """`key=value` overrides that make the measure run config run this point."""
    assert study.measure is not None
    cfg, b = point.config, point.config.batch
    pools, _ = pools_of(cfg)
    out = [
        f"run_dir={run_dir}",
        f"trainer.ranks={pools['train']}",
        f"generator.ranks={pools['gen']}",
        f"generator.prompts_per_step={b.prompts}",
        f"generator.samples_per_prompt={b.samples_per_prompt}",
        f"generator.max_new_tokens={b.response_tokens}",
        f"sync.max_staleness={cfg.staleness}",
        f"trainer.steps={study.measure.steps}",
        "checkpoint.every_steps=0",
        "log.eval_every_steps=0",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    custom = cfg.models.policy.custom
    if custom is not None:
        out += [
            f"model.init.hidden={custom.hidden}",
            f"model.init.layers={custom.layers}",
            f"model.init.heads={custom.heads}",
            f"model.init.kv_heads={custom.kv_heads or custom.heads}",
            f"model.init.intermediate={custom.ffn}",
            f"model.init.tie_embeddings={custom.tied_embeddings}",
        ]
    return out + list(study.measure.overrides)
