"""TRL-signature reward functions that tests/unit/test_rewards.py loads by import path.

Written exactly as a TRL user would (https://huggingface.co/docs/trl/grpo_trainer, "Using a
custom reward function"): keyword arguments, dataset columns by name, `**kwargs` for the rest.
"""

from __future__ import annotations

CALLS: list[dict] = []  # the keyword arguments of every call of `recorder`


def recorder(prompts, completions, completion_ids, **kwargs):
    CALLS.append(
        {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs}
    )
    return [float(len(ids)) for ids in completion_ids]


def length_reward(completions, **kwargs):
    """Characters of the completion text (conversational or standard)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(t)) for t in texts]


def only_labelled(completions, label, **kwargs):
    """1.0 / 0.0 on samples with a label, None (not applicable) where the label is None."""
    return [None if lab is None else float(lab == "good") for lab in label]


def never_applies(completions, **kwargs):
    return [None] * len(completions)


def inverse_distance_to_8(completions, **kwargs):
    """Fails on an 8-character completion (ZeroDivisionError), whichever sample it is."""
    return [1.0 / (len(c) - 8) for c in completions]


def fails_only_batched(completions, **kwargs):
    if len(completions) > 1:
        raise RuntimeError("batch too big")
    return [1.0]


def one_too_few(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def text_at_second(completions, **kwargs):
    return [1.0, "high"] + [0.0] * (len(completions) - 2)


def infinite_first(completions, **kwargs):
    return [float("inf")] + [0.0] * (len(completions) - 1)


def returns_a_number(completions, **kwargs):
    return 1.0


def by_step(completions, trainer_state, **kwargs):
    """A curriculum reward: reads the step as TRL users do."""
    return [float(trainer_state.global_step)] * len(completions)


def logs_things(completions, log_metric, log_extra, **kwargs):
    log_metric("judge_calls", len(completions))
    log_extra("verdict", ["ok"] * len(completions))
    return [0.5] * len(completions)


async def async_judge(completions, **kwargs):
    return [2.0] * len(completions)


NOT_A_FUNCTION = 42
