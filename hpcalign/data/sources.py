"""Where a run's prompts and rewards come from: a TRL-format dataset, or a built-in task.

Both roles see one shape (`Prompts`, what `data.datasets.PromptDataset` offers): `len`,
`prompt(i)`, `column_values(indices)` and `is_conversational`, plus a `RewardSet` with
TRL's call convention. A built-in task (`task.*`, the quickstart's "reverse") is a
standard-prompt dataset with an `answer` column (`TaskPrompts`) and its reward a TRL
function of that column (`partial_match`, or `task.reward` wrapped by `TaskReward`), so
the generator and trainer have one path for both. A task's row i is its index i, so
prompt order, sampling and rewards are bitwise those of the task code before the seam.

    sources = load_sources(cfg)                 # cfg.data.train, or cfg.task
    rows = indices_for_step(len(sources.train), cfg.seed, step, prompts_per_step)
    total, per_function = sources.rewards.score(prompts, texts, ids, columns, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hpcalign.config.schema import Config
from hpcalign.data.datasets import Prompt, load_prompt_dataset, render_prompt
from hpcalign.data.tasks import Task, load_reward, make_task
from hpcalign.rewards import RewardFunction, RewardSet, load_reward_functions
from hpcalign.rewards.builtin import completion_text, partial_match

ANSWER = "answer"  # the column the SFT warm-up trains on and task rewards compare with


class Prompts(Protocol):
    """Rows of prompts with their other columns (a `PromptDataset` or a `TaskPrompts`)."""

    path: str
    is_conversational: bool
    columns: list[str]

    def __len__(self) -> int: ...

    def prompt(self, i: int) -> Prompt: ...

    def column_values(self, indices: Sequence[int]) -> dict[str, list]: ...


class TaskPrompts:
    """Task indices `indices` as a standard-prompt dataset with an `answer` column."""

    is_conversational = False
    columns = [ANSWER]

    def __init__(self, task: Task, indices: range) -> None:
        self.task = task
        self.indices = indices
        self.path = f"task:{task.name}"

    def __len__(self) -> int:
        return len(self.indices)

    def prompt(self, i: int) -> str:
        return self.task.prompt(self.indices[int(i)])

    def column_values(self, indices: Sequence[int]) -> dict[str, list]:
        return {ANSWER: [self.task.answer(self.indices[int(i)]) for i in indices]}


class TaskReward:
    """A `task.reward` function `(prompt, answer, completion) -> float` with TRL's signature."""

    def __init__(self, fn: Callable[[str, str, str], float], name: str) -> None:
        self.fn = fn
        self.__name__ = name

    def __call__(self, prompts: Sequence[str], completions: Sequence[Any],
                 answer: Sequence[str], **kwargs: Any) -> list[float]:
        return [float(self.fn(p, a, completion_text(c)))
                for p, a, c in zip(prompts, answer, completions, strict=True)]


@dataclass
class Sources:
    """The prompts and rewards of a run."""

    train: Prompts
    eval: Prompts | None
    rewards: RewardSet
    name: str
    """What the shards record as `task`: the task's name, or the training file."""
    task: Task | None = None
    """The built-in task behind `train`/`eval` (None for a dataset)."""


def load_sources(cfg: Config, symbols: Iterable[str] | None = None) -> Sources:
    """`cfg.data.train` (+ `data.eval`) with `reward.functions`, else the built-in task.

    `symbols` (a char tokenizer's characters) makes a task refuse text the model cannot
    spell, as `data.tasks.make_task` does.
    """
    if cfg.data.train is not None:
        train = load_prompt_dataset(cfg.data.train)
        held_out = load_prompt_dataset(cfg.data.eval) if cfg.data.eval else None
        rewards = load_reward_functions(cfg.reward.functions, cfg.reward.weights)
        return Sources(train, held_out, rewards, name=cfg.data.train)
    assert cfg.task is not None  # the config's rule: data.train or a task
    task = make_task(cfg.task, cfg.seed, symbols=symbols)
    evals = task.eval_indices()
    if cfg.reward.functions:
        rewards = load_reward_functions(cfg.reward.functions, cfg.reward.weights)
    else:
        rewards = RewardSet([_task_reward(cfg.task.reward)])
    return Sources(TaskPrompts(task, range(task.num_prompts)),
                   TaskPrompts(task, evals) if len(evals) else None, rewards,
                   name=task.name, task=task)


def _task_reward(spec: str | None) -> RewardFunction:
    if spec is None:
        return RewardFunction("partial_match", "hpcalign.rewards.builtin:partial_match",
                              partial_match, 1.0)
    fn = load_reward(spec)
    name = getattr(fn, "__name__", "task_reward")
    return RewardFunction(name, spec, TaskReward(fn, name), 1.0)


def render(tokenizer: Any, prompts: Prompts, indices: Sequence[int]) -> list[list[int]]:
    """Token ids of rows `indices` in the tokenizer's own convention (`render_prompt`)."""
    return [render_prompt(tokenizer, prompts.prompt(int(i))) for i in indices]
