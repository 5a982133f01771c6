"""Real local runs of `configs/grpo-hf.yaml` on users' kinds of models and data.

Stand-in HF models built here (tests/standins.py: a Qwen2 with ChatML and two EOS ids, a
Llama whose tokenizer adds `<s>`), TRL-format datasets (conversational JSONL, standard
Parquet) and TRL-signature reward functions from a test module (hf_rewards.py, imported by
the generator ranks through PYTHONPATH), through the real `hpcalign run` (mpiexec, one
trainer and one generator). Each run is a few seconds of steps on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import hf_rewards
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from local_runs import ROOT, checkpoint_tensors, hpcalign_argv, metrics, shard_checksums
from standins import llama_standin, qwen_standin
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpcalign.data.datasets import render_prompt
from hpcalign.data.shards import read_shard, shard_path

GRPO_HF = os.path.join(ROOT, "configs", "grpo-hf.yaml")
HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["hello", "world", "the", "answer", "sum", "think", "letters", "digits", "step", "add"]
SMALL = [
    "generator.prompts_per_step=4", "generator.samples_per_prompt=4",
    "generator.max_new_tokens=8", "trainer.micro_batch=0", "log.progress=false",
    "log.tensorboard=false", "log.eval_every_steps=0", "comm.timeout_s=120",
]


def hpcalign_run(run_dir, model_dir, data, rewards: str, *overrides: str,
                 faults: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HPCALIGN_FAULTS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")]))
    if faults:
        env["HPCALIGN_FAULTS"] = faults
    argv = hpcalign_argv("run", GRPO_HF, f"run_dir={run_dir}", f"model.path={model_dir}",
                         f"data.train={data}", f"reward.functions={rewards}", *SMALL, *overrides)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def copy_rows(n: int, seed: int, conversational: bool, blanks: bool = True) -> list[dict]:
    """"repeat: w1 w2" -> "w1 w2" rows; with `blanks` every 5th answer is empty (the
    reward function then returns None)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        text = f"repeat: {words}"
        prompt = [{"role": "user", "content": text}] if conversational else text
        rows.append({"prompt": prompt, "answer": "" if blanks and i % 5 == 4 else words, "id": i})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def shards_of(run_dir, steps: int) -> list:
    return [read_shard(shard_path(str(run_dir), step, 0)) for step in range(steps)]


def assert_checkpoint_is_the_users_model(run_dir, step: int, model_dir: str) -> None:
    saved = os.path.join(run_dir, "checkpoints", f"step-{step:06d}", "model")
    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors"):
            with open(os.path.join(model_dir, name), "rb") as a, open(os.path.join(saved, name), "rb") as b:
                assert a.read() == b.read(), f"{name} changed in the checkpoint"
    original, again = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(saved)
    for text in ("repeat: hello world", "ÜnïcΘde 😀 12+7=19\n"):
        assert again(text).input_ids == original(text).input_ids
    model = AutoModelForCausalLM.from_pretrained(saved)
    trained = checkpoint_tensors(run_dir, step)
    for name, tensor in model.state_dict().items():
        if f"model/{name}" in trained:
            assert torch.equal(tensor, trained[f"model/{name}"]), name


def test_qwen_chat_jsonl_shards_hold_the_reward_functions_values(tmp_path):
    model_dir = qwen_standin(tmp_path / "qwen")
    rows = copy_rows(24, seed=0, conversational=True)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    run_dir = tmp_path / "run"
    hpcalign_run(run_dir, model_dir, data, "[hf_rewards:shared_prefix, hf_rewards:brevity]",
                 "reward.weights=[1.0, 0.5]", "trainer.steps=3", "checkpoint.every_steps=0",
                 f"data.eval={data}", "log.eval_every_steps=3")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    for batch in shards_of(run_dir, 3):
        assert batch.reward_names == ("shared_prefix", "brevity")
        completions = [ids.tolist() for ids in batch.completion_tokens.to_list()]
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        chats = [[{"role": "assistant", "content": t}] for t in texts]
        answers = [rows[i]["answer"] for i in batch.prompt_ids]
        prompts = [rows[i]["prompt"] for i in batch.prompt_ids]
        # what the user's functions say of these completions is what the shard holds
        expected = np.array([hf_rewards.shared_prefix(prompts, chats, completions, answers),
                             hf_rewards.brevity(chats, completions)], dtype=np.float64).T
        np.testing.assert_array_equal(batch.reward_values, expected.astype(np.float32))
        total = np.nansum(expected.astype(np.float32) * np.float32([1.0, 0.5]), axis=1)
        np.testing.assert_array_equal(batch.rewards, total.astype(np.float32))
        assert np.isnan(batch.reward_values[:, 0]).any() == any(a == "" for a in answers)
        for i, tokens in enumerate(batch.prompt_tokens.to_list()):  # the chat template's ids
            assert tokens.tolist() == render_prompt(tokenizer, prompts[i])
        for ids, finished in zip(completions, batch.finished):
            assert (ids[-1] in eos) == bool(finished) and not eos & set(ids[:-1])
    last = metrics(run_dir)[-1]
    for key in ("reward_shared_prefix_mean", "reward_brevity_mean", "time_reward_s",
                "eval_reward", "eval_reward_shared_prefix_mean"):
        assert key in last, key
    assert_checkpoint_is_the_users_model(run_dir, 3, model_dir)


def test_llama_parquet_standard_prompts(tmp_path):
    model_dir = llama_standin(tmp_path / "llama")
    rows = copy_rows(16, seed=1, conversational=False)
    rows[3]["prompt"] = "repeat: " + " ".join(WORDS * 3)  # over data.max_prompt_tokens
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    run_dir = tmp_path / "run"
    hpcalign_run(run_dir, model_dir, str(path), "[exact_match]", "trainer.steps=4",
                 "trainer.micro_batch=3", "data.max_prompt_tokens=16", "checkpoint.every_steps=0")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos = tokenizer.convert_tokens_to_ids("<s>")
    seen = set()
    for batch in shards_of(run_dir, 4):
        seen.update(batch.prompt_ids.tolist())
        for i, tokens in zip(batch.prompt_ids, batch.prompt_tokens.to_list()):
            ids = tokens.tolist()
            assert ids == tokenizer(rows[i]["prompt"]).input_ids and ids.count(bos) == 1
            assert ids[0] == bos and len(ids) <= 16
    assert 3 not in seen  # skipped, and counted
    assert sum(r["prompts_skipped"] for r in metrics(run_dir)) == 1
    assert_checkpoint_is_the_users_model(run_dir, 4, model_dir)


def test_killed_after_a_checkpoint_mid_epoch_resumes_bitwise(tmp_path):
    """10 prompts, 4 a step: epochs end inside steps 2 and 4; a SIGKILL of the trainer
    right after checkpoint 2, then a rerun, ends exactly as an uninterrupted run."""
    model_dir = qwen_standin(tmp_path / "qwen")
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(10, seed=2, conversational=True))
    common = ["trainer.steps=6", "checkpoint.every_steps=2", "sync.max_staleness=1"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    rewards = "[hf_rewards:shared_prefix]"
    hpcalign_run(reference, model_dir, data, rewards, *common)
    killed = hpcalign_run(resumed, model_dir, data, rewards, *common,
                          faults="after-checkpoint@2", check=False)
    assert killed.returncode != 0 and "run failed" in killed.stderr, killed.stderr[-2000:]
    assert os.listdir(resumed / "faults") == ["after-checkpoint@2.fired"]
    hpcalign_run(resumed, model_dir, data, rewards, *common, faults="after-checkpoint@2")
    want, got = checkpoint_tensors(reference, 6), checkpoint_tensors(resumed, 6)
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert shard_checksums(resumed) == shard_checksums(reference)
    assert [r["step"] for r in metrics(resumed)] == list(range(6))
    assert [r["reward_mean"] for r in metrics(resumed)] == [r["reward_mean"] for r in metrics(reference)]


def test_sft_warmup_then_grpo_raises_the_reward(tmp_path):
    """Copying 1-3 words after "repeat:", on a BPE Qwen stand-in (hidden 128): a short SFT
    warm-up on the dataset's answers leaves it at ~0.1; GRPO takes it to ~0.3 in 120 steps."""
    model_dir = qwen_standin(tmp_path / "qwen", hidden=128)
    data = write_jsonl(tmp_path / "train.jsonl", copy_rows(200, 0, True, blanks=False))
    run_dir = tmp_path / "run"
    hpcalign_run(run_dir, model_dir, data, "[hf_rewards:shared_prefix]",
                 "generator.prompts_per_step=8", "generator.samples_per_prompt=8",
                 "trainer.steps=120", "trainer.lr=5e-4", "trainer.kl_coef=0.0",
                 "trainer.sft_warmup_steps=40", "trainer.sft_batch=32", "trainer.sft_lr=2e-3",
                 "checkpoint.every_steps=0", "sync.max_staleness=0")
    rewards = [r["reward_mean"] for r in metrics(run_dir)]
    first, last = np.mean(rewards[:20]), np.mean(rewards[-20:])
    assert last > first + 0.08, (first, last)
    assert os.path.isdir(run_dir / "sft")


def test_grpo_7b_config_starts_on_a_stand_in_with_qwen25_conventions(tmp_path):
    """configs/grpo-7b.yaml as written (bf16, math_verify on GSM8K-style chat prompts,
    micro-batches, staleness 1), shrunk to one trainer and one generator on the CPU."""
    model_dir = qwen_standin(tmp_path / "qwen", dtype="bfloat16")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
             "answer": f"{a}+{b}={a + b}\n#### {a + b}"} for a in range(3) for b in range(3)]
    data = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    run_dir = tmp_path / "run"
    argv = hpcalign_argv(
        "run", os.path.join(ROOT, "configs", "grpo-7b.yaml"), f"run_dir={run_dir}",
        f"model.path={model_dir}", f"data.train={data}", "trainer.ranks=1", "generator.ranks=1",
        "generator.backend=torch",  # the config's vLLM TP 2 needs the vLLM venv and 2 ranks
        "trainer.device=cpu", "generator.device=cpu", "comm.dist_backend=gloo",
        "generator.prompts_per_step=2", "generator.samples_per_prompt=4",
        "generator.max_new_tokens=8", "trainer.steps=2", "log.eval_every_steps=0")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows_logged = metrics(run_dir)
    assert [r["step"] for r in rows_logged] == [0, 1]
    assert "reward_math_verify_mean" in rows_logged[-1]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for batch in shards_of(run_dir, 2):
        assert batch.reward_names == ("math_verify",) and batch.attrs["task"] == data
        for i, tokens in zip(batch.prompt_ids, batch.prompt_tokens.to_list()):
            assert tokens.tolist() == render_prompt(tokenizer, rows[i]["prompt"])
    saved = checkpoint_tensors(run_dir, 2)
    assert all(t.dtype == torch.bfloat16 for k, t in saved.items() if k.startswith("model/"))
