"""Tasks: hand-made rewards, determinism, train/eval disjointness, JSONL and user rewards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hpcalign.config.schema import TaskConfig
from hpcalign.data.tasks import make_task, partial_match_reward, prompts_for_step
from hpcalign.errors import UserError
from hpcalign.models.tiny import DEFAULT_SYMBOLS


@pytest.mark.parametrize(("completion", "answer", "expected"), [
    ("cba", "cba", 1.0),
    ("cbx", "cba", 2 / 3),
    ("", "cba", 0.0),
    ("cbaa", "cba", 3 / 4),  # too long: no exact match, divided by the longer length
    ("c", "cba", 1 / 3),
    ("abc", "cba", 1 / 3),  # only the middle position agrees
    ("", "", 1.0),
])
def test_partial_match_reward(completion, answer, expected):
    assert partial_match_reward("ignored=", answer, completion) == pytest.approx(expected)


def test_reverse_prompts_answers_and_rewards():
    task = make_task(TaskConfig(name="reverse", min_len=2, max_len=5, num_prompts=500), seed=1)
    assert task.name == "reverse" and task.num_prompts == 500
    lengths = set()
    for i in range(200):
        prompt, answer = task.prompt(i), task.answer(i)
        word = prompt[:-1]
        assert prompt.endswith("=") and word.isalpha() and word.islower()
        assert answer == word[::-1]
        lengths.add(len(word))
        assert task.reward(i, answer) == 1.0
        assert task.reward(i, answer + "z") == pytest.approx(len(answer) / (len(answer) + 1))
    assert lengths == {2, 3, 4, 5}


def test_add_prompts_answers_and_rewards():
    task = make_task(TaskConfig(name="add", min_len=1, max_len=2, num_prompts=300), seed=4)
    digit_counts = set()
    for i in range(200):
        a, b = task.prompt(i)[:-1].split("+")
        assert task.prompt(i).endswith("=")
        assert task.answer(i) == str(int(a) + int(b))
        for operand in (a, b):
            assert operand == str(int(operand))  # no leading zeros
            digit_counts.add(len(operand))
        assert task.reward(i, task.answer(i)) == 1.0
    assert digit_counts == {1, 2}
    assert set(task.symbols) <= set(DEFAULT_SYMBOLS)


def test_same_seed_same_prompts_other_seed_other_prompts():
    cfg = TaskConfig(num_prompts=1000)
    a, b, c = make_task(cfg, 7), make_task(cfg, 7), make_task(cfg, 8)
    first = [a.prompt(i) for i in range(50)]
    assert first == [b.prompt(i) for i in range(50)]
    assert first != [c.prompt(i) for i in range(50)]
    assert a.prompt(a.num_prompts) == b.prompt(b.num_prompts)


def test_eval_prompts_are_held_out_by_index_and_by_text():
    # 2-letter words: only 676 distinct problems, so 2,000 training draws would collide
    cfg = TaskConfig(min_len=2, max_len=2, num_prompts=2000, eval_prompts=50)
    task = make_task(cfg, seed=3)
    evals = task.eval_indices()
    assert evals == range(2000, 2050)
    eval_texts = {task.prompt(i) for i in evals}
    train_texts = {task.prompt(i) for i in range(task.num_prompts)}
    assert not eval_texts & train_texts
    for step in range(3):
        indices = prompts_for_step(task, step, 64, seed=3)
        assert indices.max() < task.num_prompts and indices.min() >= 0


def test_too_few_distinct_problems_is_a_user_error():
    task = make_task(TaskConfig(min_len=1, max_len=1, num_prompts=10, eval_prompts=300), seed=0)
    with pytest.raises(UserError, match="eval_prompts"):
        task.prompt(0)


def test_prompts_for_step_walks_shuffled_epochs():
    task = make_task(TaskConfig(num_prompts=40, eval_prompts=5), seed=0)
    steps = [prompts_for_step(task, s, 16, seed=9) for s in range(5)]  # 80 = 2 epochs
    stream = np.concatenate(steps)
    assert all(s.dtype == np.int64 and s.shape == (16,) for s in steps)
    assert sorted(stream[:40]) == list(range(40)) and sorted(stream[40:]) == list(range(40))
    assert list(stream[:40]) != list(range(40))  # shuffled
    assert list(stream[:40]) != list(stream[40:])  # each epoch reshuffled
    assert np.array_equal(prompts_for_step(task, 3, 16, seed=9), steps[3])  # step 3 straddles
    assert not np.array_equal(prompts_for_step(task, 0, 16, seed=10), steps[0])
    big = prompts_for_step(task, 1, 100, seed=9)  # more prompts than a whole epoch
    assert big.shape == (100,) and big.max() < 40


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_task_split_and_symbols(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}=", "answer": f"a{i}"}) for i in range(10)] + [""]
    cfg = TaskConfig(name="jsonl", prompts=_write(tmp_path / "p.jsonl", lines), eval_prompts=3)
    task = make_task(cfg, seed=0)
    assert task.num_prompts == 7 and task.eval_indices() == range(7, 10)
    pairs = {(task.prompt(i), task.answer(i)) for i in range(10)}
    assert pairs == {(f"q{i}=", f"a{i}") for i in range(10)}
    i = 4
    assert task.reward(i, task.answer(i)) == 1.0
    assert task.reward(i, "a") == pytest.approx(0.5)
    assert set(task.symbols) == set("qa=0123456789")
    make_task(cfg, seed=0, symbols=DEFAULT_SYMBOLS)  # covered: no error
    other = make_task(cfg, seed=1)
    assert [other.prompt(i) for i in range(10)] != [task.prompt(i) for i in range(10)]


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", ['{"prompt": "a", "answer": "b"}', '{"prompt": oops}'])
    with pytest.raises(UserError, match=r"bad\.jsonl:2: bad JSON"):
        make_task(TaskConfig(name="jsonl", prompts=bad, eval_prompts=0), seed=0)
    no_answer = _write(tmp_path / "na.jsonl", ['{"prompt": "a"}'])
    with pytest.raises(UserError, match=r"na\.jsonl:1"):
        make_task(TaskConfig(name="jsonl", prompts=no_answer, eval_prompts=0), seed=0)
    with pytest.raises(UserError, match="missing.jsonl"):
        make_task(TaskConfig(name="jsonl", prompts=str(tmp_path / "missing.jsonl")), seed=0)
    small = _write(tmp_path / "s.jsonl", ['{"prompt": "a", "answer": "b"}'] * 3)
    with pytest.raises(UserError, match="eval_prompts"):
        make_task(TaskConfig(name="jsonl", prompts=small, eval_prompts=3), seed=0)
    with pytest.raises(UserError, match="task.prompts"):
        make_task(TaskConfig(name="jsonl"), seed=0)


def test_symbols_not_covered_by_tokenizer(tmp_path):
    upper = _write(tmp_path / "u.jsonl", ['{"prompt": "AB=", "answer": "BA"}'] * 2)
    with pytest.raises(UserError, match="AB"):
        make_task(TaskConfig(name="jsonl", prompts=upper, eval_prompts=1), seed=0,
                  symbols=DEFAULT_SYMBOLS)
    with pytest.raises(UserError, match="'z'"):
        make_task(TaskConfig(name="reverse"), seed=0, symbols="abcdefghijklmnopqrstuvwxy=")


def test_user_reward_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length_match(prompt, answer, completion):\n"
        "    return 1.0 if len(completion) == len(answer) else -1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = make_task(TaskConfig(reward="my_rewards:length_match"), seed=0)
    answer = task.answer(0)
    assert task.reward(0, "x" * len(answer)) == 1.0
    assert task.reward(0, answer + "x") == -1.0
    # a JSONL file without answers is fine when the user's reward does not need them
    path = _write(tmp_path / "p.jsonl", ['{"prompt": "a"}', '{"prompt": "bb"}'])
    jtask = make_task(TaskConfig(name="jsonl", prompts=path, eval_prompts=1,
                                 reward="my_rewards:length_match"), seed=0)
    assert jtask.answer(0) == "" and jtask.reward(0, "") == 1.0


@pytest.mark.parametrize(("spec", "match"), [
    ("no_such_module_xyz:f", "cannot import module"),
    ("json:no_such_function", "no function"),
    ("just_a_name", "module:function"),
])
def test_bad_reward_spec_is_a_user_error(spec, match):
    with pytest.raises(UserError, match=match):
        make_task(TaskConfig(reward=spec), seed=0)


def test_unknown_task_name():
    with pytest.raises(UserError, match="reverse, add, jsonl"):
        make_task(TaskConfig(name="sort"), seed=0)
