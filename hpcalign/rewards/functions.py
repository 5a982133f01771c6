"""Reward functions with TRL's signature: load them by name or import path, score a batch.

Why: a TRL user's rewards are plain functions called by `GRPOTrainer._calculate_rewards`
(trl/trainer/grpo_trainer.py) as

    fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
       **dataset_columns, trainer_state=state, log_extra=..., log_metric=...)

returning one float or None per completion. `RewardSet.score` calls them exactly so, so the
same file works in both. TRL semantics kept here: None means "does not apply" (NaN in the
per-function values); the weighted sum is a nansum over functions; a sample for which EVERY
function returned None gets NaN (TRL >= 1.x calls it "unscorable": excluded from the group
baseline, advantage 0) rather than 0. Dataset columns named "completion" or
"completion_ids" are not passed (TRL drops them too).

What differs: `trainer_state` is a small `TrainerState` (global_step, max_steps, epoch)
instead of transformers' object; `log_extra(column, values)` and `log_metric(name, value)`
collect into `RewardSet.logged_extra` / `logged_metrics` for the caller to record.

    rewards = load_reward_functions(["math_verify", "my_rewards:brevity"], [1.0, 0.1])
    total, per_function = rewards.score(prompts, texts, ids, columns, conversational=False)
    metrics = rewards.metrics(per_function)  # {"reward_math_verify_mean": ..., ...}
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hpcalign.errors import UserError
from hpcalign.rewards.builtin import REWARDS

_NOT_PASSED = ("completion", "completion_ids")  # dataset columns TRL does not pass on


class RewardError(UserError):
    """A reward function raised or returned something unusable; names it and the sample."""

    def __init__(self, function: str, sample: int | None, reason: str) -> None:
        where = f" on sample {sample}" if sample is not None else ""
        super().__init__(f"reward function '{function}'{where}: {reason}")
        self.function = function
        self.sample = sample


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """What reward functions get as `trainer_state` (the fields TRL users read)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    """One loaded reward: the callable, its spec as configured, metric name and weight."""

    name: str
    spec: str
    fn: Callable[..., Any]
    weight: float


def _resolve(spec: str) -> Callable[..., Any]:
    if spec in REWARDS:
        return REWARDS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(
            f"reward '{spec}' is neither a built-in ({', '.join(REWARDS)}) nor 'module:function'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is the user's to fix
        raise UserError(
            f"reward '{spec}': cannot import module '{module_name}' ({type(err).__name__}: {err})"
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward '{spec}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward '{spec}': '{attr}' is a {type(obj).__name__}, not a function")
    return obj


def _function_name(fn: Callable[..., Any]) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__name__", None) or type(inner).__name__


def load_reward_functions(
    specs: Sequence[str], weights: Sequence[float] | None = None
) -> RewardSet:
    """The reward functions `specs` name (built-in short names or 'module:function')."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise UserError(
            "no reward functions given; name at least one (e.g. 'math_verify' or 'module:function')"
        )
    if weights is None:
        weights = [1.0] * len(specs)
    if len(weights) != len(specs):
        raise UserError(
            f"{len(weights)} reward weights for {len(specs)} reward functions "
            f"({', '.join(specs)}); give one weight per function"
        )
    functions: list[RewardFunction] = []
    seen: dict[str, int] = defaultdict(int)
    for spec, weight in zip(specs, weights):
        if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise UserError(f"reward '{spec}': weight {weight!r} must be a finite number")
        fn = _resolve(spec)
        name = _function_name(fn)
        seen[name] += 1
        if seen[name] > 1:  # the same function twice (or two format_reward_for): keep metrics apart
            name = f"{name}_{seen[name]}"
        functions.append(RewardFunction(name, spec, fn, float(weight)))
    return RewardSet(functions)


def _value(raw: Any) -> float | None:
    """A reward value as float, None for "not applicable"; raises TypeError for anything else."""
    if raw is None:
        return None
    if hasattr(raw, "ndim") and getattr(raw, "ndim", None) == 0:  # numpy / torch scalars
        raw = raw.item()
    if isinstance(raw, numbers.Real):  # bool, int, float, numpy numbers
        value = float(raw)
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise TypeError(f"returned {value} (rewards must be finite numbers or None)")
        return value
    raise TypeError(
        f"returned {type(raw).__name__} {_short(raw)} (rewards must be numbers or None)"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RewardSet:
    """Several reward functions and their weights, scored together like TRL's GRPOTrainer."""

    def __init__(self, functions: Sequence[RewardFunction]) -> None:
        self.functions = list(functions)
        self.names = [f.name for f in self.functions]
        self.weights = np.array([f.weight for f in self.functions], dtype=np.float32)
        self.logged_metrics: dict[str, float] = {}
        self.logged_extra: dict[str, list] = {}

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        columns: dict[str, list],
        *,
        conversational: bool = False,
        trainer_state: TrainerState | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(weighted sum [B] float32, {name: values [B] float32, NaN for None}) of B completions.

        `completions` are decoded texts; with `conversational` each is passed as
        `[{"role": "assistant", "content": text}]`. `columns` hold the dataset's other
        columns, one value per completion (prompts repeated per sample, as TRL does).
        """
        size = len(completions)
        lengths = {
            "prompts": len(prompts),
            "completion_ids": len(completion_ids),
            **{f"columns[{k!r}]": len(v) for k, v in columns.items()},
        }
        wrong = {k: n for k, n in lengths.items() if n != size}
        if wrong:
            raise ValueError(f"{size} completions but {wrong}")
        texts: list[Any] = (
            [[{"role": "assistant", "content": t}] for t in completions]
            if conversational
            else list(completions)
        )
        metrics: dict[str, list[float]] = defaultdict(list)
        extra: dict[str, list] = defaultdict(list)
        kwargs = {k: list(v) for k, v in columns.items() if k not in _NOT_PASSED}
        kwargs.update(
            trainer_state=trainer_state,
            log_extra=lambda column, values: extra[column].extend(values),
            log_metric=lambda name, value: metrics[name].append(float(value)),
        )
        per_function: dict[str, np.ndarray] = {}
        for function in self.functions:
            per_function[function.name] = self._call(
                function, list(prompts), texts, list(completion_ids), kwargs
            )
        self.logged_metrics = {name: float(np.mean(values)) for name, values in metrics.items()}
        self.logged_extra = dict(extra)
        if not self.functions or size == 0:
            return np.zeros(size, np.float32), per_function
        stacked = np.stack([per_function[name] for name in self.names], axis=1)  # [B, F]
        total = np.nansum(stacked * self.weights[None, :], axis=1).astype(np.float32)
        total[np.isnan(stacked).all(axis=1)] = np.nan  # unscorable: every function returned None
        return total, per_function

    def metrics(self, per_function: dict[str, np.ndarray]) -> dict[str, float]:
        """`reward_<name>_mean` per function over the samples it applied to (NaN if none)."""
        out = {}
        for name, values in per_function.items():
            applied = values[~np.isnan(values)]
            out[f"reward_{name}_mean"] = float(applied.mean()) if applied.size else math.nan
        return out

    def _call(
        self,
        function: RewardFunction,
        prompts: list,
        completions: list,
        completion_ids: list,
        kwargs: dict[str, Any],
    ) -> np.ndarray:
        size = len(completions)
        try:
            raw = _invoke(function.fn, prompts, completions, completion_ids, kwargs)
        # user code: any failure becomes a message naming the function and the sample
        except Exception as err:
            sample = _first_failing_sample(
                function.fn, prompts, completions, completion_ids, kwargs
            )
            hint = (
                ""
                if sample is not None
                else f" (on the batch of {size}; no single sample fails alone)"
            )
            raise RewardError(
                function.name, sample, f"raised {type(err).__name__}: {err}{hint}"
            ) from err
        if isinstance(raw, str | bytes | dict) or not hasattr(raw, "__len__"):
            raise RewardError(
                function.name,
                None,
                f"returned {type(raw).__name__} {_short(raw)}; expected a "
                f"list of {size} numbers or None",
            )
        values = list(raw)
        if len(values) != size:
            raise RewardError(
                function.name, None, f"returned {len(values)} values for {size} completions"
            )
        out = np.empty(size, dtype=np.float32)
        for i, item in enumerate(values):
            try:
                value = _value(item)
            except TypeError as err:
                raise RewardError(function.name, i, str(err)) from None
            out[i] = np.nan if value is None else value
        return out


def _invoke(
    fn: Callable[..., Any],
    prompts: list,
    completions: list,
    completion_ids: list,
    kwargs: dict[str, Any],
) -> Any:
    result = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    if inspect.isawaitable(result):  # async rewards (LLM judges), as TRL allows
        result = asyncio.run(_awaited(result))
    return result


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _first_failing_sample(
    fn: Callable[..., Any],
    prompts: list,
    completions: list,
    completion_ids: list,
    kwargs: dict[str, Any],
) -> int | None:
    """The first sample on which `fn` raises when called on it alone (error path only)."""
    quiet = dict(kwargs, log_extra=lambda *a: None, log_metric=lambda *a: None)
    for i in range(len(completions)):
        one = {
            k: (v[i : i + 1] if k not in ("trainer_state", "log_extra", "log_metric") else v)
            for k, v in quiet.items()
        }
        try:
            _invoke(fn, prompts[i : i + 1], completions[i : i + 1], completion_ids[i : i + 1], one)
        except Exception:  # the sample that fails
            return i
    return None
