"""Verifiable tasks: prompts, reference answers and rule-based rewards, all deterministic.

A task maps an integer index to a prompt string and its answer; the reward compares a
completion (text without special tokens) with the answer. Indices `0 .. num_prompts - 1`
are training prompts, `eval_indices()` is a held-out range after them. Generated tasks make
the eval prompts' TEXT disjoint from training too (a training index whose text equals an
eval prompt draws again), because short problems repeat: 3-letter "reverse" words alone
cover 17,576 strings, far fewer than the default 100,000 training prompts.

Built-ins (a plain registry, `TASKS`):
- "reverse": `abc=` -> `cba`, letters a-z, `task.min_len .. task.max_len` letters.
- "add": `12+7=` -> `19`, each operand with `task.min_len .. task.max_len` digits.
- "jsonl": `task.prompts`, one `{"prompt": ..., "answer": ...}` object per line; a
  seed-shuffled `task.eval_prompts` of the lines are held out.
Default reward (`partial_match_reward`): 1.0 for an exact match, else the number of
positions where completion and answer agree divided by the longer length, so format and
partial progress earn credit. `task.reward = "module:function"` replaces it with a user
function `(prompt, answer, completion) -> float`.

Training order: `prompts_for_step` walks seed-shuffled epochs over the training indices,
so any step's prompts can be recomputed from (seed, step) alone (resume needs no state).
"""

from __future__ import annotations

import functools
import importlib
import json
import string
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from hpcalign.config.schema import TaskConfig
from hpcalign.data.datasets import indices_for_step
from hpcalign.errors import UserError
from hpcalign.rewards.builtin import partial_match_score

RewardFn = Callable[[str, str, str], float]  # (prompt, answer, completion) -> reward

_MAX_REDRAWS = 1000  # draws of one training prompt before declaring the problem space too small


class Task(Protocol):
    """What the generator needs from a task; indices are deterministic from (seed, index)."""

    name: str
    symbols: str
    num_prompts: int

    def prompt(self, index: int) -> str: ...

    def answer(self, index: int) -> str: ...

    def reward(self, index: int, completion: str) -> float: ...

    def eval_indices(self) -> range: ...


def partial_match_reward(prompt: str, answer: str, completion: str) -> float:
    """1.0 if `completion == answer`, else matching positions / max(len(completion), len(answer)).

    The (prompt, answer, completion) form of the built-in reward `partial_match`.
    """
    return partial_match_score(answer, completion)


def load_reward(spec: str) -> RewardFn:
    """Import a user reward function given as 'module:function'."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"task.reward='{spec}' must be 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is the user's to fix
        raise UserError(f"task.reward='{spec}': cannot import module '{module_name}' ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"task.reward='{spec}': module '{module_name}' has no function '{attr}'")
    return fn


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, *keys]))


class _GeneratedTask:
    """Shared machinery of the built-in generated tasks: index -> problem text."""

    name = ""
    symbols = ""
    _salt = 0

    def __init__(self, cfg: TaskConfig, seed: int, reward_fn: RewardFn) -> None:
        self.num_prompts = cfg.num_prompts
        self.min_len, self.max_len = cfg.min_len, cfg.max_len
        self._seed = seed
        self._eval_count = cfg.eval_prompts
        self._reward_fn = reward_fn

    def _problem(self, rng: np.random.Generator) -> tuple[str, str]:
        raise NotImplementedError

    @functools.cached_property
    def _eval_texts(self) -> frozenset[str]:
        return frozenset(self._draw(i, 0)[0] for i in self.eval_indices())

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (tasks live for the whole run)
    def _item(self, index: int) -> tuple[str, str]:
        if not 0 <= index < self.num_prompts + self._eval_count:
            raise IndexError(f"{self.name}: prompt index {index} out of range")
        if index >= self.num_prompts:
            return self._draw(index, 0)
        for attempt in range(_MAX_REDRAWS):
            item = self._draw(index, attempt)
            if item[0] not in self._eval_texts:
                return item
        raise UserError(
            f"task '{self.name}' with min_len={self.min_len}, max_len={self.max_len} has too "
            f"few distinct problems to hold out task.eval_prompts={self._eval_count}; raise "
            "task.max_len or lower task.eval_prompts"
        )

    def _draw(self, index: int, attempt: int) -> tuple[str, str]:
        return self._problem(_rng(self._seed, self._salt, index, attempt))

    def prompt(self, index: int) -> str:
        return self._item(index)[0]

    def answer(self, index: int) -> str:
        return self._item(index)[1]

    def reward(self, index: int, completion: str) -> float:
        prompt, answer = self._item(index)
        return float(self._reward_fn(prompt, answer, completion))

    def eval_indices(self) -> range:
        return range(self.num_prompts, self.num_prompts + self._eval_count)


class ReverseTask(_GeneratedTask):
    """`abc=` -> `cba`: reverse min_len..max_len lowercase letters."""

    name = "reverse"
    symbols = string.ascii_lowercase + "="
    _salt = 1

    def _problem(self, rng: np.random.Generator) -> tuple[str, str]:
        length = int(rng.integers(self.min_len, self.max_len + 1))
        word = "".join(string.ascii_lowercase[i] for i in rng.integers(0, 26, size=length))
        return f"{word}=", word[::-1]


class AddTask(_GeneratedTask):
    """`12+7=` -> `19`: add two integers of min_len..max_len digits each (no leading zeros)."""

    name = "add"
    symbols = string.digits + "+="
    _salt = 2

    def _operand(self, rng: np.random.Generator) -> int:
        digits = int(rng.integers(self.min_len, self.max_len + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    def _problem(self, rng: np.random.Generator) -> tuple[str, str]:
        a, b = self._operand(rng), self._operand(rng)
        return f"{a}+{b}=", str(a + b)


class JsonlTask:
    """Prompts and answers from a JSONL file; a seed-shuffled subset is held out for eval."""

    name = "jsonl"

    def __init__(self, cfg: TaskConfig, seed: int, reward_fn: RewardFn, custom_reward: bool) -> None:
        if not cfg.prompts:
            raise UserError("task.name='jsonl' needs task.prompts=PATH (a JSONL file)")
        items = _read_jsonl(cfg.prompts, require_answer=not custom_reward)
        if cfg.eval_prompts >= len(items):
            raise UserError(
                f"{cfg.prompts}: {len(items)} prompts leave none for training with "
                f"task.eval_prompts={cfg.eval_prompts}; lower task.eval_prompts"
            )
        order = _rng(seed, 3).permutation(len(items))
        # index k is line order[k]: training 0..n-eval-1, eval n-eval..n-1
        self._items = [items[i] for i in order]
        self.num_prompts = len(items) - cfg.eval_prompts
        self._reward_fn = reward_fn
        self.symbols = "".join(sorted({c for p, a in items for c in p + a}))

    def prompt(self, index: int) -> str:
        return self._items[index][0]

    def answer(self, index: int) -> str:
        return self._items[index][1]

    def reward(self, index: int, completion: str) -> float:
        prompt, answer = self._items[index]
        return float(self._reward_fn(prompt, answer, completion))

    def eval_indices(self) -> range:
        return range(self.num_prompts, len(self._items))


def _read_jsonl(path: str, require_answer: bool) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{line_no}: bad JSON ({err.msg})") from err
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise UserError(f"{path}:{line_no}: expected an object with a string 'prompt'")
                answer = record.get("answer", None if require_answer else "")
                if not isinstance(answer, str):
                    raise UserError(f"{path}:{line_no}: expected a string 'answer'")
                items.append((record["prompt"], answer))
    except OSError as err:
        raise UserError(f"task.prompts: cannot read {path} ({err.strerror})") from err
    if not items:
        raise UserError(f"{path}: no prompts")
    return items


TASKS: dict[str, type[_GeneratedTask]] = {"reverse": ReverseTask, "add": AddTask}


def make_task(cfg: TaskConfig, seed: int, symbols: Iterable[str] | None = None) -> Task:
    """The task `cfg` describes. With `symbols` (the tokenizer's characters or vocabulary),
    refuse a task whose text the tokenizer cannot spell."""
    reward_fn = load_reward(cfg.reward) if cfg.reward else partial_match_reward
    if cfg.name == "jsonl":
        task: Task = JsonlTask(cfg, seed, reward_fn, custom_reward=cfg.reward is not None)
    elif cfg.name in TASKS:
        task = TASKS[cfg.name](cfg, seed, reward_fn)
    else:
        known = ", ".join([*TASKS, "jsonl"])
        raise UserError(f"task.name='{cfg.name}' is not one of: {known}")
    if symbols is not None:
        check_symbols(task, symbols)
    return task


def check_symbols(task: Task, symbols: Iterable[str]) -> None:
    """UserError listing the task's characters that `symbols` lacks."""
    missing = sorted(set(task.symbols) - set(symbols))
    if missing:
        raise UserError(
            f"task '{task.name}' uses characters the model's tokenizer lacks: "
            f"{''.join(missing)!r}; rebuild the model with 'hpcalign init-model --symbols ...'"
        )


def prompts_for_step(task: Task, step: int, prompts_per_step: int, seed: int) -> np.ndarray:
    """Training prompt indices [prompts_per_step] (int64) of `step`: a shuffled epoch order.

    Position `step * prompts_per_step + j` of the stream is element `pos % N` of epoch
    `pos // N`'s permutation (N = task.num_prompts), so steps are reproducible from the seed.
    The walk is `hpcalign.data.datasets.indices_for_step`, shared with prompt datasets.
    """
    if step < 0 or prompts_per_step < 1:
        raise ValueError(f"step={step} must be >= 0 and prompts_per_step={prompts_per_step} >= 1")
    return indices_for_step(task.num_prompts, seed, step, prompts_per_step)
