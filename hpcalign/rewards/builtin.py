"""Built-in reward functions with TRL's signature, registered by short name in `REWARDS`.

Each is called like any user reward, `fn(prompts=..., completions=..., completion_ids=...,
**dataset_columns, trainer_state=...)`, and returns one float (or None: "does not apply to
this sample") per completion. Completions are strings for standard prompts and
`[{"role": "assistant", "content": text}]` for conversational ones, as in TRL.

- `exact_match`: 1.0 when the completion, stripped, equals the `answer` column, stripped.
- `math_verify`: 1.0 when HF math-verify finds the completion's answer equal to the gold
  one: MATH-style `solution` (the gold is its `\\boxed{}`) or GSM8K-style `answer` (the
  gold follows "####"). None where the gold cannot be parsed, like TRL's `accuracy_reward`.
- `partial_match` (by import path, `hpcalign.rewards.builtin:partial_match`): 1.0 when
  the completion equals the `answer` column exactly, else the share of positions where
  they agree (of the longer one): the built-in tasks' reward, which gives credit for
  format and partial progress.
- `format_reward` (short name "format"): 1.0 when the completion is
  `<think>...</think>` followed by `<answer>...</answer>`. `format_reward_for(pattern)` makes
  one for another regex; a config names it by import path, e.g. `my_rewards:tagged`, after
  `tagged = format_reward_for(r"...")` in `my_rewards.py`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

Completion = str | list[dict[str, Any]]
RewardFunc = Callable[..., list[float | None]]

DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"


def completion_text(completion: Completion) -> str:
    """The text of one completion: the string itself, or its messages' contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def _gold_text(value: Any) -> str | None:
    """A dataset value as text: None stays None, 4.0 (a JSON number via Arrow) becomes "4"."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def exact_match(
    completions: Sequence[Completion], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 if the stripped completion equals the stripped `answer`, else 0.0; None if no answer."""
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_text = _gold_text(gold)
        rewards.append(
            None
            if gold_text is None
            else float(completion_text(completion).strip() == gold_text.strip())
        )
    return rewards


def partial_match_score(answer: str, completion: str) -> float:
    """1.0 if `completion == answer`, else matching positions / max(len(completion), len(answer))."""
    if completion == answer:
        return 1.0
    matches = sum(1 for a, b in zip(completion, answer) if a == b)
    return matches / max(len(completion), len(answer))


def partial_match(
    completions: Sequence[Completion], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """`partial_match_score` of each completion against `answer` (not stripped); None if no answer."""
    return [
        None if gold is None else partial_match_score(_gold_text(gold), completion_text(c))
        for c, gold in zip(completions, answer, strict=True)
    ]


def _gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K solution: "... #### 1,234" -> "1234" (all of it without ####)."""
    final = answer.rsplit("####", 1)[-1]
    return final.strip().replace(",", "")


def math_verify(
    completions: Sequence[Completion],
    solution: Sequence[Any] | None = None,
    answer: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 / 0.0 by math-verify against `solution` (MATH, `\\boxed{}`) or `answer` (GSM8K, "####").

    With both columns, `solution` is the gold. None for a sample whose gold does not parse.
    """
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if solution is None and answer is None:
        raise ValueError(
            "math_verify needs a 'solution' (MATH-style) or 'answer' (GSM8K-style) column"
        )
    golds = (
        [_gold_text(s) for s in solution]
        if solution is not None
        else [None if a is None else _gsm8k_gold(_gold_text(a)) for a in answer]
    )
    # NOTE: math-verify times out with signal.alarm, which works only in the main thread
    # (TRL's accuracy_reward does the same).
    main_thread = threading.current_thread() is threading.main_thread()
    parse_timeout, verify_timeout = (10, 5) if main_thread else (None, None)
    if not main_thread:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    # the completion's answer: \boxed{} first, then other LaTeX, then a plain number/expression
    # (TRL uses LaTeX only; small models and GSM8K write "#### 42" or "The answer is 42")
    extraction = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(units=True),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        ),
        ExprExtractionConfig(),
    ]
    rewards: list[float | None] = []
    for completion, gold in zip(completions, golds, strict=True):
        gold_parsed = parse(gold, parsing_timeout=parse_timeout) if gold else []
        if not gold_parsed:
            rewards.append(None)
            continue
        predicted = parse(
            completion_text(completion),
            extraction_config=extraction,
            extraction_mode="first_match",
            parsing_timeout=parse_timeout,
        )
        rewards.append(float(verify(gold_parsed, predicted, timeout_seconds=verify_timeout)))
    return rewards


class _FormatReward:
    """A reward of 1.0 for completions that fully match `pattern` (DOTALL), else 0.0."""

    def __init__(self, pattern: str, name: str) -> None:
        self.pattern = re.compile(pattern, re.DOTALL)
        self.__name__ = name

    def __call__(self, completions: Sequence[Completion], **kwargs: Any) -> list[float | None]:
        return [
            float(self.pattern.fullmatch(completion_text(c).strip()) is not None)
            for c in completions
        ]

    def __repr__(self) -> str:
        return f"format_reward_for({self.pattern.pattern!r})"


def format_reward_for(pattern: str, name: str = "format_reward") -> RewardFunc:
    """A TRL-signature reward: 1.0 when the stripped completion fully matches `pattern`.

    A callable object rather than a closure, so it pickles (spawned processes) and keeps a
    `__name__` for the `reward_<name>_mean` metric.
    """
    try:
        return _FormatReward(pattern, name)
    except re.error as err:
        raise ValueError(f"format pattern {pattern!r} is not a valid regex ({err})") from err


format_reward = format_reward_for(DEFAULT_FORMAT_PATTERN)

REWARDS: dict[str, RewardFunc] = {
    "exact_match": exact_match,
    "math_verify": math_verify,
    "format": format_reward,
}
