"""TRL-signature reward functions: loading, the exact call, weights, None, errors, built-ins."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import reward_fns

from hpcalign.errors import UserError
from hpcalign.rewards import (
    REWARDS,
    RewardError,
    TrainerState,
    exact_match,
    format_reward,
    format_reward_for,
    load_reward_functions,
    math_verify,
)

PROMPTS = ["reverse abc", "add 2+3=", "hello"]
TEXTS = ["cba", " 5 ", "hi there"]
IDS = [[1, 2], [3], [4, 5, 6]]


def _score(specs, weights=None, columns=None, **kw):
    rewards = load_reward_functions(specs, weights)
    return rewards, *rewards.score(PROMPTS, TEXTS, IDS, columns or {}, **kw)


def test_called_exactly_as_trl_calls_it():
    reward_fns.CALLS.clear()
    state = TrainerState(global_step=7, max_steps=100, epoch=0.5)
    columns = {"answer": ["cba", "5", "x"], "completion": ["c1", "c2", "c3"], "level": [1, 2, 3]}
    _, total, per = _score(["reward_fns:recorder"], columns=columns, trainer_state=state)
    (call,) = reward_fns.CALLS
    # TRL: prompts, completions, completion_ids, every column but "completion"/"completion_ids",
    # trainer_state, log_extra, log_metric
    assert set(call) == {
        "prompts",
        "completions",
        "completion_ids",
        "answer",
        "level",
        "trainer_state",
        "log_extra",
        "log_metric",
    }
    assert (
        call["prompts"] == PROMPTS
        and call["completions"] == TEXTS
        and call["completion_ids"] == IDS
    )
    assert call["answer"] == ["cba", "5", "x"] and call["level"] == [1, 2, 3]
    assert call["trainer_state"] is state
    assert total.dtype == np.float32 and list(total) == [2.0, 1.0, 3.0]
    assert list(per) == ["recorder"] and list(per["recorder"]) == [2.0, 1.0, 3.0]


def test_conversational_completions_are_assistant_messages():
    reward_fns.CALLS.clear()
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    rewards = load_reward_functions(["reward_fns:recorder", "reward_fns:length_reward"])
    total, per = rewards.score(prompts, TEXTS, IDS, {}, conversational=True)
    call = reward_fns.CALLS[0]
    assert call["completions"] == [[{"role": "assistant", "content": t}] for t in TEXTS]
    assert call["prompts"] == prompts
    assert list(per["length_reward"]) == [3.0, 3.0, 8.0]
    assert list(total) == [5.0, 4.0, 11.0]


def test_weights_and_none_by_hand():
    columns = {"label": ["good", None, "bad"]}
    rewards, total, per = _score(
        ["reward_fns:length_reward", "reward_fns:only_labelled"], [0.5, 2.0], columns
    )
    # lengths 3, 3, 8; labels 1.0, None, 0.0
    assert list(per["length_reward"]) == [3.0, 3.0, 8.0]
    assert (
        per["only_labelled"][0] == 1.0
        and math.isnan(per["only_labelled"][1])
        and per["only_labelled"][2] == 0
    )
    assert list(total) == [0.5 * 3 + 2.0 * 1, 0.5 * 3, 0.5 * 8 + 2.0 * 0]
    assert rewards.metrics(per) == {
        "reward_length_reward_mean": pytest.approx(14 / 3),
        "reward_only_labelled_mean": 0.5,
    }  # None ignored: mean of 1 and 0


def test_all_none_sample_is_unscorable_nan_like_trl():
    columns = {"label": [None, "good", None]}
    rewards, total, per = _score(
        ["reward_fns:only_labelled", "reward_fns:never_applies"], [1.0, 3.0], columns
    )
    assert math.isnan(total[0]) and total[1] == 1.0 and math.isnan(total[2])
    metrics = rewards.metrics(per)
    assert metrics["reward_only_labelled_mean"] == 1.0 and math.isnan(
        metrics["reward_never_applies_mean"]
    )


def test_default_weights_duplicates_and_builtin_names():
    rewards = load_reward_functions(
        ["reward_fns:length_reward", "reward_fns:length_reward", "format"]
    )
    assert rewards.names == ["length_reward", "length_reward_2", "format_reward"]
    assert list(rewards.weights) == [1.0, 1.0, 1.0]
    assert rewards.functions[2].fn is REWARDS["format"] is format_reward
    assert (
        load_reward_functions(["hpcalign.rewards.builtin:format_reward"]).functions[0].fn
        is format_reward
    )


def test_trainer_state_log_metric_log_extra_and_async():
    rewards = load_reward_functions(
        ["reward_fns:by_step", "reward_fns:logs_things", "reward_fns:async_judge"]
    )
    total, per = rewards.score(PROMPTS, TEXTS, IDS, {}, trainer_state=TrainerState(global_step=4))
    assert list(per["by_step"]) == [4.0] * 3 and list(per["async_judge"]) == [2.0] * 3
    assert list(total) == [6.5] * 3
    assert rewards.logged_metrics == {"judge_calls": 3.0}
    assert rewards.logged_extra == {"verdict": ["ok"] * 3}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            "reward_fns:inverse_distance_to_8",
            r"'inverse_distance_to_8' on sample 2: raised ZeroDivisionError",
        ),
        (
            "reward_fns:fails_only_batched",
            r"'fails_only_batched': raised RuntimeError: batch too big \(on the batch of 3",
        ),
        ("reward_fns:one_too_few", r"'one_too_few': returned 2 values for 3 completions"),
        (
            "reward_fns:text_at_second",
            r"'text_at_second' on sample 1: returned str 'high' \(rewards must be numbers",
        ),
        ("reward_fns:infinite_first", r"'infinite_first' on sample 0: returned inf"),
        (
            "reward_fns:returns_a_number",
            r"'returns_a_number': returned float 1\.0; expected a list of 3",
        ),
    ],
)
def test_bad_reward_results_name_function_and_sample(spec, match):
    with pytest.raises(RewardError, match=match) as info:
        _score([spec])
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("specs", "weights", "match"),
    [
        (
            ["no_such_module_xyz:f"],
            None,
            r"reward 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz'",
        ),
        (
            ["reward_fns:missing"],
            None,
            r"reward 'reward_fns:missing': module 'reward_fns' has no attribute 'missing'",
        ),
        (
            ["reward_fns:NOT_A_FUNCTION"],
            None,
            r"reward 'reward_fns:NOT_A_FUNCTION': 'NOT_A_FUNCTION' is a int, not a",
        ),
        (
            ["accuracy"],
            None,
            r"reward 'accuracy' is neither a built-in \(exact_match, math_verify, format\)",
        ),
        (
            ["format", "exact_match"],
            [1.0],
            r"1 reward weights for 2 reward functions \(format, exact_match\)",
        ),
        (["format"], [float("nan")], r"reward 'format': weight nan must be a finite number"),
        ([], None, r"no reward functions given"),
    ],
)
def test_load_errors_name_the_spec(specs, weights, match):
    with pytest.raises(UserError, match=match):
        load_reward_functions(specs, weights)


def test_exact_match_standard_conversational_and_numbers():
    assert exact_match(["cba", " 5\n", "x"], answer=["cba", "5", "y"]) == [1.0, 1.0, 0.0]
    conversational = [
        [{"role": "assistant", "content": " 8 "}],
        [{"role": "assistant", "content": "7"}],
    ]
    assert exact_match(conversational, answer=[8.0, None]) == [1.0, None]  # Arrow's 8.0 is "8"


GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Altogether 48+24 = <<48+24=72>>72 clips.\n#### 72"
)
MATH_GOLD = r"The total is $\frac{2}{6}$, which simplifies to $\boxed{\frac{1}{3}}$."


def test_math_verify_gsm8k_answers():
    completions = ["She sold 72 clips.\n#### 72", "The answer is 71", "I do not know", "#### 1,234"]
    golds = [GSM8K_GOLD, GSM8K_GOLD, GSM8K_GOLD, "... #### 1,234"]
    assert math_verify(completions, answer=golds) == [1.0, 0.0, 0.0, 1.0]
    assert math_verify(["#### 72"], answer=["no final answer here"]) == [None]  # gold unparsable


def test_math_verify_boxed_solutions_and_trl_shape():
    completions = [
        [{"role": "assistant", "content": r"So it is \boxed{\frac{2}{6}}"}],
        [{"role": "assistant", "content": r"\boxed{\frac{1}{2}}"}],
        [{"role": "assistant", "content": r"\boxed{3}"}],
    ]
    solutions = [MATH_GOLD, MATH_GOLD, r"There is no answer: $\boxed{}$"]
    assert math_verify(completions, solution=solutions) == [1.0, 0.0, None]
    rewards = load_reward_functions(["math_verify"])
    total, per = rewards.score(
        ["q"] * 3,
        [c[0]["content"] for c in completions],
        [[1]] * 3,
        {"solution": solutions},
        conversational=True,
    )
    assert list(total[:2]) == [1.0, 0.0] and math.isnan(total[2])
    with pytest.raises(
        RewardError, match=r"'math_verify'.*needs a 'solution' \(MATH-style\) or 'answer'"
    ):
        rewards.score(["q"], ["1"], [[1]], {})


def test_format_reward_and_custom_pattern():
    good = "<think>\n2+2 is 4\n</think>\n<answer>4</answer>"
    assert format_reward([good, "<answer>4</answer>", good + " trailing", "  " + good + "\n"]) == [
        1.0,
        0.0,
        0.0,
        1.0,
    ]
    assert format_reward([[{"role": "assistant", "content": good}]]) == [1.0]
    tagged = format_reward_for(r"#### \d+", name="gsm8k_format")
    assert tagged(["#### 12", "12"]) == [1.0, 0.0] and tagged.__name__ == "gsm8k_format"
    assert pickle.loads(pickle.dumps(tagged))(["#### 3"]) == [1.0]
    with pytest.raises(ValueError, match="not a valid regex"):
        format_reward_for("(unclosed")
