"""`hpcalign train-rm`: Bradley-Terry on TRL-format pairs, held-out accuracy, and a checkpoint
`transformers` loads and scores exactly as hpcalign does."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from hpcalign.cli import main as cli_main
from hpcalign.config.schema import ModelInit
from hpcalign.models.reward_model import (
    bradley_terry_loss,
    load_reward_model,
    pack_right,
    sequence_rewards,
)
from hpcalign.models.tiny import init_model

LETTERS = "abcdefgh"


def _pairs(path, count: int, seed: int) -> None:
    """prompt "abc=", chosen its reversal, rejected the word copied unreversed (the
    quickstart policy's commonest mistake before it learns)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
            while word == word[::-1]:
                word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
            wrong = word
            f.write(json.dumps({"prompt": word + "=", "chosen": word[::-1],
                                "rejected": wrong}) + "\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("rm") / "base")
    init_model(path, ModelInit(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
    return path


def test_bradley_terry_matches_the_formula():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    margin = torch.tensor([0.5, 0.0, 1.0])
    expected = [-math.log(1 / (1 + math.exp(-(c - r - m))))
                for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())]
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin),
                               torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_train_rm_learns_and_transformers_scores_its_checkpoint_the_same(base, tmp_path, capsys):
    _pairs(tmp_path / "train.jsonl", 1000, seed=0)
    _pairs(tmp_path / "eval.jsonl", 100, seed=1)
    run_dir = tmp_path / "rm"
    assert cli_main(["train-rm", "configs/rm-tiny.yaml", f"model.path={base}",
                     f"data.train={tmp_path / 'train.jsonl'}",
                     f"data.eval={tmp_path / 'eval.jsonl'}", f"run_dir={run_dir}",
                     "trainer.steps=300", "trainer.eval_every_steps=150"]) == 0
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    assert len(rows) == 300 and len(evals) == 2
    assert evals[-1] >= 0.9, evals  # from ~0.5 for the untrained head
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "held-out accuracy" in capsys.readouterr().out

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = run_dir / "model"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(base, name)):
            assert (out / name).read_bytes() == open(os.path.join(base, name), "rb").read()
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert loaded.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["abc=cba", "abcd=abcd", "hg=gh"]
    # as trained and as a policy's finished sample: the completion, then EOS
    sequences = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]
    with torch.no_grad():
        ids, mask = pack_right(sequences, 0, torch.device("cpu"))
        ours = sequence_rewards(loaded, ids, mask)  # padded batch, our pooling
        theirs = torch.cat([loaded(input_ids=torch.tensor([s])).logits[:, 0] for s in sequences])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours[0] > ours[1]  # the correct reversal scores above the wrong one


def test_a_reward_model_directory_loads_whole(base, tmp_path):
    first = load_reward_model(base, seed=3)
    again = load_reward_model(base, seed=3)
    torch.testing.assert_close(first.score.weight, again.score.weight)  # seeded head


@pytest.mark.parametrize("row, message", [
    ({"prompt": "ab=", "rejected": "ab"}, "no 'chosen' column"),
    ({"prompt": "ab=", "chosen": [{"role": "user", "content": "x"}], "rejected": "ab"},
     "role is 'user'"),
    ({"prompt": "ab=", "chosen": "ba", "rejected": "ab", "margin": "big"},
     "field 'margin' must be a finite number"),
])
def test_bad_pairs_are_named(base, tmp_path, capsys, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert cli_main(["train-rm", "configs/rm-tiny.yaml", f"model.path={base}",
                     f"data.train={path}", f"run_dir={tmp_path / 'rm'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("layout", ["parquet", "disk"])
def test_conversational_pairs_render_with_the_chat_template(tmp_path, layout):
    """TRL's conversational preference shape from Parquet / a datasets directory: the prompt
    through the chat template with the generation prompt, the assistant's content after it,
    then EOS (what a policy's finished sample holds)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from standins import qwen_standin
    from transformers import AutoTokenizer

    from hpcalign.data.preferences import load_preference_dataset

    model = qwen_standin(tmp_path / "qwen")
    rows = [{"prompt": [{"role": "user", "content": "two plus two"}],
             "chosen": [{"role": "assistant", "content": "four"}],
             "rejected": [{"role": "assistant", "content": "five"}], "margin": 1.5}]
    if layout == "parquet":
        path = str(tmp_path / "pairs.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = str(tmp_path / "pairs")
        datasets.Dataset.from_list(rows).save_to_disk(path)
    pairs = load_preference_dataset(path)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt, chosen, rejected = pairs.tokens(tokenizer, 0)
    text = tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True,
                                         tokenize=False)
    assert prompt == tokenizer(text, add_special_tokens=False).input_ids
    assert chosen == tokenizer("four", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert rejected[-1] == tokenizer.eos_token_id and pairs.margins == [1.5]
    assert pairs.is_conversational
