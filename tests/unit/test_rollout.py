"""`hpcalign rollout` end to end on real tiny models: shards, slicing, determinism, resume,
TRL-format datasets (JSONL, Parquet, conversational) and TRL-signature reward functions."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import asdict

import h5py
import numpy as np
import pytest
import torch

from hpcalign.cli import main as cli_main
from hpcalign.commands import rollout as rollout_command
from hpcalign.config.schema import ModelInit
from hpcalign.data.shards import read_shard
from hpcalign.engines import SamplingParams
from hpcalign.engines.offline import offline_shard_path, prompt_order, slice_prompts
from hpcalign.engines.rollouts import sample_seed
from hpcalign.errors import ShardError, UserError
from hpcalign.models.hf import load_model
from hpcalign.models.tiny import init_model

# 7 prompts; two without an answer (their rewards are NaN, not 0)
PROMPTS = [{"prompt": "abc=", "answer": "cba"}, {"prompt": "hello="}, {"prompt": "xy=", "answer": "yx"},
           {"prompt": "mpi=", "answer": "ipm"}, {"prompt": "gpu="}, {"prompt": "k=", "answer": "k"},
           {"prompt": "shard=", "answer": "drahs"}]
K = 2  # samples per prompt


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("rollout") / "model")
    init_model(path, ModelInit(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64))
    return path


@pytest.fixture(scope="module")
def checkpoint_dir(model_dir, tmp_path_factory) -> str:
    """The layout `roles/checkpoint.py` writes: model/ in HF format + state.json."""
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "step-000200"
    shutil.copytree(model_dir, path / "model")
    (path / "state.json").write_text(json.dumps({"format_version": 1, "step": 200,
                                                  "policy_version": 7}))
    return str(path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


def _rollout(checkpoint: str, prompts: str, out, *extra: str) -> int:
    return cli_main(["rollout", "--checkpoint", checkpoint, "--prompts", prompts, "--out", str(out),
                     "--samples-per-prompt", str(K), "--max-new-tokens", "4", "--batch-size", "3",
                     *extra])


def _shards(out) -> dict[str, str]:
    """{file name: checksum} of every shard in `out`, each fully validated."""
    checksums = {}
    for name in sorted(n for n in os.listdir(out) if n.startswith("shard-") and n.endswith(".h5")):
        path = os.path.join(out, name)
        read_shard(path, retry_s=0)  # raises unless complete and intact
        with h5py.File(path, "r") as f:
            checksums[name] = str(f.attrs["checksum"])
    return checksums


def test_round_trip_every_prompt_k_times(checkpoint_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert _rollout(checkpoint_dir, prompts_file, out, "--num-shards", "1") == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert list(_shards(out)) == ["shard-0000-00000.h5", "shard-0000-00001.h5",
                                  "shard-0000-00002.h5"]  # 7 prompts in batches of 3
    _, tokenizer = load_model(os.path.join(checkpoint_dir, "model"))
    seen: list[str] = []
    for name in _shards(out):
        batch = read_shard(str(out / name))
        assert batch.policy_version == 7 and batch.step == 7
        assert batch.attrs["checkpoint"] == os.path.realpath(checkpoint_dir)
        assert batch.attrs["prompts"] == os.path.realpath(prompts_file)
        assert (batch.attrs["samples_per_prompt"], batch.attrs["max_new_tokens"]) == (K, 4)
        assert (batch.attrs["temperature"], batch.attrs["top_p"], batch.attrs["top_k"]) == (1.0, 1.0, 0)
        assert batch.attrs["seed"] == 1234 and batch.attrs["task"] == "jsonl"
        assert (batch.completion_tokens.lengths() <= 4).all()
        for i in range(len(batch)):
            tokens = batch.prompt_tokens[i].tolist()
            assert tokens[0] == tokenizer.convert_tokens_to_ids("<bos>")
            text = tokenizer.decode(tokens[1:])
            seen.append(text)
            has_answer = next(p for p in PROMPTS if p["prompt"] == text).get("answer")
            assert np.isnan(batch.rewards[i]) != bool(has_answer), text
        ids = batch.prompt_ids
        assert (ids[::K] == ids[1::K]).all()  # groups adjacent
    assert sorted(seen) == sorted([p["prompt"] for p in PROMPTS] * K)

    summary = json.loads((out / "rollout-summary-0000.json").read_text())
    assert (summary["shards_written"], summary["shards_skipped"]) == (3, 0)
    assert (summary["samples"], summary["scored_samples"]) == (7 * K, 5 * K)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("rollout 0/1: 3 shards written, 0 skipped, 14 samples of 7 prompts")


def test_three_array_tasks_cover_the_prompts_disjointly(checkpoint_dir, prompts_file, tmp_path,
                                                        monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    slices = []
    for index in range(3):  # the flags' defaults come from Slurm's array variables
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(index))
        assert _rollout(checkpoint_dir, prompts_file, out) == 0
        ids = np.concatenate([read_shard(str(out / n)).prompt_ids for n in _shards(out)
                              if n.startswith(f"shard-{index:04d}-")])
        slices.append(sorted(set(ids.tolist())))
        assert len(ids) == K * len(slices[-1])
        assert (out / f"rollout-summary-{index:04d}.json").exists()
    # slices of one fixed shuffle of the rows: disjoint, complete, sizes 3/2/2
    order = prompt_order(len(PROMPTS))
    assert slices == [sorted(order[:3]), sorted(order[3:5]), sorted(order[5:])]
    assert sorted(sum(slices, [])) == list(range(len(PROMPTS)))


def test_slice_prompts_more_tasks_than_prompts():
    parts = [slice_prompts(2, i, 4).tolist() for i in range(4)]
    assert parts == [[0], [1], [], []]
    with pytest.raises(ValueError):
        slice_prompts(2, 4, 4)


def test_same_seed_same_bytes_other_seed_other_tokens(checkpoint_dir, prompts_file, tmp_path):
    runs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert _rollout(checkpoint_dir, prompts_file, tmp_path / name, "--seed", seed) == 0
        runs[name] = _shards(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"].keys() == runs["c"].keys()
    assert all(runs["a"][n] != runs["c"][n] for n in runs["a"])
    # each sample's own seed is recorded: a pure function of (seed, prompt row, sample index)
    batch = read_shard(offline_shard_path(str(tmp_path / "a"), 0, 0))
    assert list(batch.seeds) == [sample_seed(5, int(r), j % K)
                                 for j, r in enumerate(batch.prompt_ids)]
    assert len(set(batch.seeds.tolist())) == len(batch)


def test_resume_skips_valid_shards_and_rewrites_a_corrupt_one(checkpoint_dir, prompts_file,
                                                              tmp_path, capsys):
    out = tmp_path / "out"
    assert _rollout(checkpoint_dir, prompts_file, out) == 0
    before = _shards(out)
    inodes = {n: os.stat(out / n).st_ino for n in before}
    bad = offline_shard_path(str(out), 0, 1)
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:  # a requeued task finds a shard its disk mangled
        f.truncate(size // 2)
    with pytest.raises(ShardError):
        read_shard(bad, retry_s=0)
    capsys.readouterr()

    assert _rollout(checkpoint_dir, prompts_file, out) == 0
    assert "1 shards written, 2 skipped" in capsys.readouterr().out
    assert _shards(out) == before  # the rewrite reproduces the same bytes
    for name in before:
        assert (os.stat(out / name).st_ino == inodes[name]) == (name != os.path.basename(bad))


def test_resume_refuses_shards_of_another_rollout(checkpoint_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    assert _rollout(checkpoint_dir, prompts_file, out) == 0
    with pytest.raises(UserError, match=r"shard-0000-00000\.h5 is from another rollout.*temperature"):
        rollout_command.main(["--checkpoint", checkpoint_dir, "--prompts", prompts_file,
                              "--out", str(out), "--samples-per-prompt", str(K),
                              "--max-new-tokens", "4", "--batch-size", "3", "--temperature", "0.5"])


def test_plain_model_dir_same_tokens_as_its_checkpoint(model_dir, checkpoint_dir, prompts_file,
                                                       tmp_path):
    assert _rollout(model_dir, prompts_file, tmp_path / "plain") == 0
    assert _rollout(checkpoint_dir, prompts_file, tmp_path / "ckpt") == 0
    plain = read_shard(offline_shard_path(str(tmp_path / "plain"), 0, 0))
    ckpt = read_shard(offline_shard_path(str(tmp_path / "ckpt"), 0, 0))
    assert (plain.policy_version, ckpt.policy_version) == (0, 7)
    assert plain.attrs["checkpoint"] == os.path.realpath(model_dir)
    assert np.array_equal(plain.completion_tokens.flat, ckpt.completion_tokens.flat)


@pytest.mark.parametrize("case", ["missing", "not-a-model", "run-dir"])
def test_bad_checkpoint_is_a_user_error_naming_it(case, model_dir, prompts_file, tmp_path):
    path = tmp_path / "ckpt"
    if case != "missing":
        path.mkdir()
    if case == "run-dir":
        (path / "checkpoints").mkdir()
    with pytest.raises(UserError, match=re.escape(str(path))) as err:
        rollout_command.main(["--checkpoint", str(path), "--prompts", prompts_file,
                              "--out", str(tmp_path / "out")])
    assert ("checkpoints/step-N" in str(err.value)) == (case == "run-dir")
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_line_is_a_user_error_naming_file_and_line(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "abc="}\n{"prompt": "ab=", oops}\n')
    code = cli_main(["rollout", "--checkpoint", model_dir, "--prompts", str(prompts),
                     "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"{prompts}:2: invalid JSON" in capsys.readouterr().err


def test_prompt_the_tokenizer_cannot_spell_is_refused(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "abc=", "answer": "cba"}\n{"prompt": "ABC=", "answer": "x"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl: prompt 'ABC=' .* lacks: 'ABC'"):
        rollout_command.main(["--checkpoint", model_dir, "--prompts", str(prompts),
                              "--out", str(tmp_path / "out")])


@pytest.mark.parametrize(("flags", "message"), [
    (["--shard-index", "3", "--num-shards", "3"], "--shard-index=3 must be in 0..2"),
    (["--num-shards", "0"], "--num-shards=0 must be >= 1"),
    (["--batch-size", "0"], "--batch-size=0 must be >= 1"),
    (["--top-p", "2"], "top-p=2.0 must be in"),
    pytest.param(["--device", "cuda"], "--device=cuda but this rank sees no GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
])
def test_bad_flags_are_user_errors(flags, message, model_dir, prompts_file, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    with pytest.raises(UserError, match=message):
        rollout_command.main(["--checkpoint", model_dir, "--prompts", prompts_file,
                              "--out", str(tmp_path / "out"), *flags])


def test_sampling_defaults_are_a_runs():
    from hpcalign.config.schema import GeneratorConfig

    defaults = asdict(SamplingParams())  # the same as a run's generator section
    shared = {k: getattr(GeneratorConfig(), k) for k in defaults if hasattr(GeneratorConfig(), k)}
    assert shared == {k: defaults[k] for k in shared}
    assert len(shared) >= 5


# --- TRL-format datasets and reward functions (a user's model, not init-model's) --------

CHATS = [
    {"prompt": [{"role": "user", "content": "reverse abc"}], "label": "good"},
    {"prompt": [{"role": "user", "content": "add 2+3"}], "label": None},
    {"prompt": [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"}], "label": "bad"},
    {"prompt": [{"role": "user", "content": "a much longer question about shards and MPI "
                                            "that goes on and on"}], "label": "good"},
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    from standins import qwen_standin

    return qwen_standin(tmp_path_factory.mktemp("qwen") / "model")


@pytest.mark.parametrize("layout", ["parquet", "disk"])
def test_conversational_dataset_with_trl_reward_functions(qwen_dir, tmp_path, layout, capsys):
    """Chat prompts from Parquet / a save_to_disk directory, rendered with the model's chat
    template; two TRL reward functions by import path: the shards hold each function's
    values (recomputed here from the decoded completions) and their sum (None skipped)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    if layout == "parquet":
        prompts = str(tmp_path / "chats.parquet")
        pq.write_table(pa.Table.from_pylist(CHATS), prompts)
    else:
        prompts = str(tmp_path / "chats")
        datasets.Dataset.from_list(CHATS).save_to_disk(prompts)
    out = tmp_path / "out"
    assert cli_main(["rollout", "--checkpoint", qwen_dir, "--prompts", prompts, "--out", str(out),
                     "--samples-per-prompt", "2", "--max-new-tokens", "6",
                     "--reward", "reward_fns:length_reward",
                     "--reward", "reward_fns:only_labelled"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    batch = read_shard(offline_shard_path(str(out), 0, 0))
    assert batch.reward_names == ("length_reward", "only_labelled")
    assert sorted(set(batch.prompt_ids.tolist())) == list(range(len(CHATS)))
    assert batch.attrs["reward"] == "reward_fns:length_reward,reward_fns:only_labelled"
    for i, row in enumerate(batch.prompt_ids.tolist()):
        chat = CHATS[row]
        template = tokenizer.apply_chat_template(chat["prompt"], add_generation_prompt=True,
                                                 tokenize=False)
        assert batch.prompt_tokens[i].tolist() == tokenizer(template, add_special_tokens=False).input_ids
        text = tokenizer.decode(batch.completion_tokens[i].tolist(), skip_special_tokens=True)
        length, labelled = batch.reward_values[i]
        assert length == float(len(text))
        if chat["label"] is None:
            assert np.isnan(labelled) and batch.rewards[i] == length
        else:
            assert labelled == float(chat["label"] == "good")
            assert batch.rewards[i] == pytest.approx(length + labelled)
    assert "8 samples of 4 prompts" in capsys.readouterr().out


def test_max_prompt_tokens_skips_and_counts(qwen_dir, tmp_path, capsys):
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    out = tmp_path / "out"
    assert cli_main(["rollout", "--checkpoint", qwen_dir, "--prompts", str(prompts),
                     "--out", str(out), "--samples-per-prompt", "2", "--max-new-tokens", "4",
                     "--max-prompt-tokens", "30", "--reward", "reward_fns:length_reward"]) == 0
    batch = read_shard(offline_shard_path(str(out), 0, 0))
    assert 3 not in batch.prompt_ids.tolist()  # the long one
    assert batch.attrs["prompts_skipped"] == 1 and batch.attrs["max_prompt_tokens"] == 30
    assert (batch.prompt_tokens.lengths() <= 30).all()
    assert "(1 too long, skipped)" in capsys.readouterr().out
    summary = json.loads((out / "rollout-summary-0000.json").read_text())
    assert summary["prompts_skipped"] == 1 and summary["samples"] == 6
    # the same flags again: every shard recognised as this rollout's, nothing resampled
    assert cli_main(["rollout", "--checkpoint", qwen_dir, "--prompts", str(prompts),
                     "--out", str(out), "--samples-per-prompt", "2", "--max-new-tokens", "4",
                     "--max-prompt-tokens", "30", "--reward", "reward_fns:length_reward"]) == 0
    assert "0 shards written, 1 skipped" in capsys.readouterr().out
