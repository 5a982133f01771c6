"""`hpcalign rollout` beyond one process: the same samples for any --workers, --batch-size
and kill-and-resume; the manifest and `hpcalign inspect OUT`; `rescore`; `export` read by
`datasets`. Real tiny models, real subprocesses, real shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hpcalign.cli import main as cli_main
from hpcalign.config.schema import ModelInit
from hpcalign.data.manifest import content_hash, read_manifest
from hpcalign.data.shards import read_shard
from hpcalign.engines.rollouts import sample_seed
from hpcalign.models.tiny import init_model

# prompts of several lengths: the equal-length buckets are what keeps a sample independent
# of its neighbours, so the test needs neighbours of other lengths
PROMPTS = [{"prompt": p + "=", "answer": p[::-1]} for p in
           ["abc", "hello", "xy", "mpi", "gpu", "k", "shard", "slurm", "nccl", "vllm", "ab",
            "megatron", "qwen", "llama", "hdf"]]
K = 3
# the same command every run, but for the split
BASE = ["--samples-per-prompt", str(K), "--max-new-tokens", "6", "--seed", "11"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("workers") / "model")
    init_model(path, ModelInit(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64))
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcalign.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def _samples(out) -> dict[tuple[int, int], tuple]:
    """{(prompt row, sample index): every per-sample field} over all shards of a rollout."""
    found = {}
    for shard in read_manifest(str(out))["shards"]:
        batch = read_shard(os.path.join(out, shard["file"]), retry_s=0)
        for i in range(len(batch)):
            row = int(batch.prompt_ids[i])
            index = sum(1 for key in found if key[0] == row)
            found[(row, index)] = (batch.prompt_tokens[i].tobytes(),
                                   batch.completion_tokens[i].tobytes(),
                                   batch.logprobs[i].tobytes(), batch.rewards[i].tobytes(),
                                   int(batch.seeds[i]), bool(batch.finished[i]))
    return found


@pytest.fixture(scope="module")
def reference(model_dir, prompts_file, tmp_path_factory):
    """One worker, one batch: the samples every other split must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cli_main(["rollout", "--checkpoint", model_dir, "--prompts", prompts_file,
                     "--out", str(out), "--batch-size", "64", *BASE]) == 0
    return out


def test_samples_identical_for_any_workers_and_batch_size(model_dir, prompts_file, reference,
                                                          tmp_path):
    expected = _samples(reference)
    assert len(expected) == len(PROMPTS) * K
    # each sample's seed is its own: (seed, prompt row, index), whatever the split
    assert all(fields[4] == sample_seed(11, row, j) for (row, j), fields in expected.items())
    for name, split in (("w2b4", ["--workers", "2", "--batch-size", "4"]),
                        ("w1b3", ["--batch-size", "3"])):
        out = tmp_path / name
        done = _cli("rollout", "--checkpoint", model_dir, "--prompts", prompts_file,
                    "--out", str(out), *split, *BASE)
        assert done.returncode == 0, done.stderr
        assert _samples(out) == expected, name
    manifest = read_manifest(str(tmp_path / "w2b4"))
    assert manifest["parts"] == 2 and manifest["samples"] == len(PROMPTS) * K
    assert {s["file"][:10] for s in manifest["shards"]} == {"shard-0000", "shard-0001"}


def test_killed_then_resumed_gives_the_same_samples(model_dir, prompts_file, reference, tmp_path):
    out = tmp_path / "out"
    args = ["rollout", "--checkpoint", model_dir, "--prompts", prompts_file, "--out", str(out),
            "--batch-size", "2", *BASE]
    killed = _cli(*args, env={"HPCALIGN_FAULTS": "rollout-shard@2"})
    assert killed.returncode == -9  # SIGKILL after its third shard, as a node failure
    written = sorted(p.name for p in out.glob("shard-*.h5"))
    assert len(written) == 3 and not (out / "manifest.json").exists()
    resumed = _cli(*args, env={"HPCALIGN_FAULTS": "rollout-shard@2"})  # fired once per OUT
    assert resumed.returncode == 0, resumed.stderr
    assert "3 skipped" in resumed.stdout
    assert _samples(out) == _samples(reference)


def test_inspect_verifies_the_manifest_and_names_bad_or_foreign_shards(reference, tmp_path,
                                                                       capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    assert cli_main(["inspect", str(out)]) == 0
    manifest = read_manifest(str(out))
    assert manifest["checkpoint"]["content_hash"] == content_hash(manifest["checkpoint"]["path"])
    assert manifest["sampling"]["seed"] == 11 and manifest["sampling"]["samples_per_prompt"] == K
    shard = out / manifest["shards"][0]["file"]

    foreign = out / "shard-0009-00000.h5"
    shutil.copy(shard, foreign)
    capsys.readouterr()
    assert cli_main(["inspect", str(out)]) == 1
    assert f"{foreign}: a shard the manifest does not list" in capsys.readouterr().err
    foreign.unlink()

    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli_main(["inspect", str(out)]) == 1
    assert str(shard) in capsys.readouterr().err


def test_inspect_names_a_changed_prompt_file(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:4]))
    out = tmp_path / "out"
    assert cli_main(["rollout", "--checkpoint", model_dir, "--prompts", str(prompts),
                     "--out", str(out), *BASE]) == 0
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[1:5]))
    capsys.readouterr()
    assert cli_main(["inspect", str(out)]) == 1
    assert f"BAD prompts {prompts}" in capsys.readouterr().err


def test_rescore_adds_named_rewards_keeps_old_and_inspect_stays_green(reference, tmp_path,
                                                                      capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {s["file"]: read_shard(str(out / s["file"])) for s in read_manifest(str(out))["shards"]}
    assert cli_main(["rescore", str(out), "reward.functions=[reward_fns:length_reward]"]) == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(read_manifest(str(out))["checkpoint"]["path"])
    for name, old in before.items():
        new = read_shard(str(out / name))
        assert new.reward_names == (*old.reward_names, "length_reward")
        np.testing.assert_array_equal(new.reward_values[:, :-1], old.reward_values)
        np.testing.assert_array_equal(new.rewards, old.rewards)  # the sampled-for total stays
        texts = tokenizer.batch_decode([t.tolist() for t in new.completion_tokens.to_list()],
                                       skip_special_tokens=True)
        np.testing.assert_array_equal(new.reward_values[:, -1], [float(len(t)) for t in texts])
    assert cli_main(["inspect", str(out)]) == 0  # the manifest has the new checksums
    # the same name twice is refused, nothing changed
    capsys.readouterr()
    assert cli_main(["rescore", str(out), "reward.functions=[reward_fns:length_reward]"]) == 2
    assert "already has rewards named length_reward" in capsys.readouterr().err
    assert cli_main(["rescore", str(out), "reward.weights=[1]"]) == 2


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_is_read_by_datasets(reference, tmp_path, fmt):
    import datasets

    path = tmp_path / f"r.{fmt}"
    assert cli_main(["export", str(reference), "--format", fmt, "--out", str(path)]) == 0
    loaded = datasets.load_dataset("json" if fmt == "jsonl" else "parquet",
                                   data_files=str(path), split="train")
    assert len(loaded) == len(PROMPTS) * K
    by_key = {(r["prompt_id"], r["sample_index"]): r for r in loaded}
    for shard in read_manifest(str(reference))["shards"]:
        batch = read_shard(os.path.join(reference, shard["file"]))
        for i in range(len(batch)):
            row_id = int(batch.prompt_ids[i])
            j = int(np.sum(batch.prompt_ids[:i] == row_id))
            exported = by_key[(row_id, j)]
            assert exported["prompt"] == PROMPTS[row_id]["prompt"]
            assert exported["completion_token_ids"] == batch.completion_tokens[i].tolist()
            np.testing.assert_allclose(exported["logprobs"], batch.logprobs[i], rtol=1e-6)
            assert exported["reward"] == pytest.approx(float(batch.rewards[i]))
            assert exported["seed"] == int(batch.seeds[i])
