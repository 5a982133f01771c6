"""A run's prompts and rewards: a built-in task is a dataset + reward like any other, and
the config decides between data.train and the task, with errors naming the keys."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hpcalign.config.load import load_config
from hpcalign.data.datasets import indices_for_step
from hpcalign.data.sources import TaskPrompts, load_sources
from hpcalign.data.tasks import make_task, prompts_for_step
from hpcalign.errors import ConfigError

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
GRPO_HF = os.path.join(ROOT, "configs", "grpo-hf.yaml")


def test_a_builtin_task_is_a_dataset_with_its_reward():
    cfg = load_config(QUICKSTART, ["run_dir=/tmp/x", "task.num_prompts=500",
                                   "task.eval_prompts=20"])
    sources = load_sources(cfg)
    task = make_task(cfg.task, cfg.seed)
    assert sources.task is not None and sources.name == "reverse"
    assert len(sources.train) == 500 and len(sources.eval) == 20
    assert not sources.train.is_conversational and sources.train.columns == ["answer"]
    rows = indices_for_step(len(sources.train), cfg.seed, 3, 16)
    assert np.array_equal(rows, prompts_for_step(task, 3, 16, cfg.seed))  # the same order
    assert [sources.train.prompt(i) for i in rows] == [task.prompt(int(i)) for i in rows]
    answers = sources.train.column_values(rows)["answer"]
    assert answers == [task.answer(int(i)) for i in rows]
    assert sources.eval.prompt(0) == task.prompt(task.eval_indices()[0])
    # the reward: TRL's call convention, the task's values exactly (as float32)
    completions = [a[::-1] for a in answers[:8]] + answers[8:]
    prompts = [sources.train.prompt(i) for i in rows]
    total, per_function = sources.rewards.score(prompts, completions, [[1]] * 16,
                                                {"answer": answers})
    expected = np.array([task.reward(int(i), c) for i, c in zip(rows, completions)], np.float32)
    assert np.array_equal(total, expected) and list(per_function) == ["partial_match"]
    assert total[8:].tolist() == [1.0] * 8


def test_task_reward_by_import_path_keeps_its_old_signature(tmp_path, monkeypatch):
    (tmp_path / "old_style.py").write_text(
        "def length_gap(prompt, answer, completion):\n"
        "    return -abs(len(answer) - len(completion))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(QUICKSTART, ["run_dir=/tmp/x", "task.reward=old_style:length_gap"])
    sources = load_sources(cfg)
    assert sources.rewards.names == ["length_gap"]
    total, _ = sources.rewards.score(["ab="], ["abcd"], [[1]], {"answer": ["ba"]})
    assert total.tolist() == [-2.0]
    other = load_sources(load_config(QUICKSTART, ["run_dir=/tmp/x",
                                                  "reward.functions=[exact_match]"]))
    assert other.rewards.names == ["exact_match"]  # reward.functions replace the task's own


def test_a_dataset_with_reward_functions(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}], "answer": w}
            for w in ("yes", "no", "maybe")]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(GRPO_HF, ["model.path=/m", f"data.train={train}", f"data.eval={train}",
                                "reward.functions=[exact_match, format]",
                                "reward.weights=[1.0, 0.5]"])
    sources = load_sources(cfg)
    assert sources.task is None and sources.name == str(train)
    assert sources.train.is_conversational and len(sources.eval) == 3
    completions = ["yes", "<think>x</think> <answer>no</answer>"]
    total, per_function = sources.rewards.score(
        [sources.train.prompt(0), sources.train.prompt(1)], completions, [[1], [2]],
        sources.train.column_values([0, 1]), conversational=True)
    assert total.tolist() == [1.0, 0.5]
    assert per_function["exact_match"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.train=t.jsonl"], "data.train='t.jsonl' and a task section (task.name='reverse') "
                             "both give prompts; remove one (as an override: task=null)"),
    (["data.train=t.jsonl", "task=null"], "data.train='t.jsonl' needs reward.functions"),
    (["data.eval=e.jsonl"], "data.eval='e.jsonl' needs data.train"),
    (["reward.functions=[a, b]", "reward.weights=[1]"],
     "reward.weights has 1 values for 2 reward.functions"),
    (["data.truncation=middle"], "data.truncation='middle'"),
    (["data.max_prompt_tokens=0"], "data.max_prompt_tokens=0"),
])
def test_config_rules_name_the_keys(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["run_dir=/tmp/x", *overrides])
    assert message in str(err.value)


def test_grpo_hf_config_names_what_must_be_given():
    with pytest.raises(ConfigError) as err:
        load_config(GRPO_HF)
    text = str(err.value)
    assert "3 value(s) to set" in text
    for key in ("model.path", "data.train", "reward.functions"):
        assert f"{key}: required, no value given" in text and f"override {key}=..." in text
    cfg = load_config(GRPO_HF, ["model.path=/m", "data.train=/d.parquet",
                                "reward.functions=[my_rewards:brevity]"])
    assert cfg.task is None and cfg.model.init is None and cfg.data.max_prompt_tokens == 512


def test_task_prompts_index_a_range():
    cfg = load_config(QUICKSTART, ["run_dir=/tmp/x", "task.num_prompts=50",
                                   "task.eval_prompts=5"])
    task = make_task(cfg.task, cfg.seed)
    held_out = TaskPrompts(task, task.eval_indices())
    assert [held_out.prompt(i) for i in range(5)] == [task.prompt(i) for i in range(50, 55)]
    assert held_out.column_values([4])["answer"] == [task.answer(54)]
