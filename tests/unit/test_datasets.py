"""Prompt datasets in TRL's formats: loading, checks with file + line/row, rendering, order."""

from __future__ import annotations

import json
import socket
import tempfile

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from standins import llama_standin, qwen_standin
from transformers import AutoTokenizer

from hpcalign.data.datasets import (
    epoch_order,
    filter_prompts,
    indices_for_step,
    load_prompt_dataset,
    render_prompt,
)
from hpcalign.data.tasks import prompts_for_step
from hpcalign.errors import UserError

STANDARD = [
    {"prompt": "reverse abc", "answer": "cba", "level": 1},
    {"prompt": "add 2+3=", "answer": "5", "level": 2},
    {"prompt": "what is the sum of 4 and 4", "answer": "8", "level": 3},
]
CONVERSATIONAL = [
    {
        "prompt": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "reverse abc"},
        ],
        "answer": "cba",
        "level": 1,
    },
    {"prompt": [{"role": "user", "content": "add 2+3="}], "answer": "5", "level": 2},
    {"prompt": [{"role": "user", "content": "hello"}], "answer": "world", "level": 3},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    return {
        "qwen": AutoTokenizer.from_pretrained(qwen_standin(root / "qwen")),
        "llama": AutoTokenizer.from_pretrained(llama_standin(root / "llama")),
    }


def write_jsonl(path, records, blank_lines=False):
    lines = [json.dumps(r) for r in records]
    if blank_lines:
        lines.insert(1, "   ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def write_parquet(path, records):
    # written by pyarrow directly (list<struct<role, content>>), as pandas/other tools would
    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def write_disk(path, records):
    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return str(path)


WRITERS = {"jsonl": write_jsonl, "parquet": write_parquet, "disk": write_disk}
SUFFIX = {"jsonl": ".jsonl", "parquet": ".parquet", "disk": ""}


def _write(tmp_path, fmt, records, name="data"):
    return WRITERS[fmt](tmp_path / f"{name}{SUFFIX[fmt]}", records)


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_formats_load_with_columns(tmp_path, fmt, kind):
    records = STANDARD if kind == "standard" else CONVERSATIONAL
    ds = load_prompt_dataset(_write(tmp_path, fmt, records))
    assert len(ds) == 3
    assert ds.is_conversational == (kind == "conversational")
    assert ds.columns == ["answer", "level"]
    for i, record in enumerate(records):
        assert ds.prompt(i) == record["prompt"]
        assert ds.row(i) == record
    assert ds.column_values([2, 0, 2]) == {
        "answer": [
            "8" if kind == "standard" else "world",
            "cba",
            "8" if kind == "standard" else "world",
        ],
        "level": [3, 1, 3],
    }


def test_jsonl_blank_lines_and_json_suffix(tmp_path):
    ds = load_prompt_dataset(write_jsonl(tmp_path / "d.json", STANDARD, blank_lines=True))
    assert len(ds) == 3 and ds.prompt(1) == "add 2+3="


def test_datasetdict_directory_uses_train_split(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(STANDARD),
            "test": datasets.Dataset.from_list(STANDARD[:1]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_prompt_dataset(str(tmp_path / "dd"))) == 3
    datasets.DatasetDict({"test": datasets.Dataset.from_list(STANDARD)}).save_to_disk(
        str(tmp_path / "nt")
    )
    with pytest.raises(
        UserError, match=r"nt: a DatasetDict without a 'train' split \(splits: test\)"
    ):
        load_prompt_dataset(str(tmp_path / "nt"))


def test_loading_needs_no_network_and_leaves_no_cache(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for fmt in WRITERS:
        assert len(load_prompt_dataset(_write(tmp_path, fmt, CONVERSATIONAL))) == 3
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"prompt": "a"}', '{"question": "b"}'], r"d\.jsonl:2: missing field 'prompt'"),
        (['{"prompt": "a"}', "", '{"prompt": "b",}'], r"d\.jsonl:3: invalid JSON"),
        (
            ['{"prompt": [{"role": "user", "content": "x"}, "hi"]}'],
            r"d\.jsonl:1: field 'prompt\[1\]' must be a "
            r"\{role, content\} message, got str",
        ),
        (['{"prompt": [{"content": "x"}]}'], r"d\.jsonl:1: field 'prompt\[0\]'\.role is missing"),
        (
            ['{"prompt": [{"role": "user"}]}'],
            r"d\.jsonl:1: field 'prompt\[0\]'\.content is missing",
        ),
        (
            ['{"prompt": [{"role": "user", "content": [{"type": "text"}]}]}'],
            r"d\.jsonl:1: field 'prompt\[0\]'\.content is not a string \(list\) \(multimodal",
        ),
        (['{"prompt": []}'], r"d\.jsonl:1: field 'prompt' is an empty list"),
        (['{"prompt": 7}'], r"d\.jsonl:1: field 'prompt' must be a string or a list .* got int"),
        (['["prompt", "a"]'], r"d\.jsonl:1: expected one JSON object per line"),
        (
            ['{"prompt": "a"}', '{"prompt": [{"role": "user", "content": "b"}]}'],
            r"d\.jsonl:2: field 'prompt' is conversational \(messages\) but line 1 is standard",
        ),
        (
            ['{"prompt": "a", "answer": "4"}', '{"prompt": "b", "answer": 4}'],
            r"d\.jsonl:2: field 'answer' is a number but a string on line 1",
        ),
        ([], r"d\.jsonl: the file has no rows"),
        (["", "  "], r"d\.jsonl: the file has no rows"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, lines, match):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    with pytest.raises(UserError, match=match) as info:
        load_prompt_dataset(str(path))
    assert "\n" not in str(info.value)


def test_parquet_errors_name_file_row_and_field(tmp_path):
    cases = [
        (
            [{"prompt": 3}, {"prompt": 4}],
            r"p0\.parquet: row 0 \(0-based\) field 'prompt' must be a string .* got "
            r"int \(column type Value\('int64'\)\)",
        ),
        (
            [{"prompt": "a"}, {"prompt": None}],
            r"p1\.parquet: row 1 \(0-based\) field 'prompt' .* got NoneType",
        ),
        (
            [
                {"prompt": [{"role": "user", "content": "x"}]},
                {"prompt": [{"role": "user", "content": None}]},
            ],
            r"p2\.parquet: row 1 \(0-based\) field 'prompt\[0\]'\.content is missing",
        ),
        ([{"question": "a"}], r"p3\.parquet: no 'prompt' column \(columns: question\)"),
    ]
    for k, (records, match) in enumerate(cases):
        with pytest.raises(UserError, match=match):
            load_prompt_dataset(write_parquet(tmp_path / f"p{k}.parquet", records))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    with pytest.raises(UserError, match=r"empty\.parquet: the dataset has no rows"):
        load_prompt_dataset(str(empty))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(
        UserError, match=r"junk\.parquet: not a Parquet file \(ArrowInvalid: Parquet magic bytes"
    ):
        load_prompt_dataset(str(tmp_path / "junk.parquet"))


def test_disk_errors_name_directory_and_row(tmp_path):
    bad = [
        {"prompt": [{"role": "user", "content": "x"}]},
        {"prompt": [{"role": None, "content": "y"}]},
    ]
    with pytest.raises(
        UserError, match=r"dsk: row 1 \(0-based\) field 'prompt\[0\]'\.role is missing"
    ):
        load_prompt_dataset(write_disk(tmp_path / "dsk", bad))
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=r"plain: not a dataset directory written by save_to_disk"):
        load_prompt_dataset(str(tmp_path / "plain"))


def test_path_errors(tmp_path):
    with pytest.raises(
        UserError, match=r"openai/gsm8k: no such file or directory \(hub datasets are not"
    ):
        load_prompt_dataset("openai/gsm8k")
    (tmp_path / "d.csv").write_text("prompt\na\n")
    with pytest.raises(UserError, match=r"d\.csv: unknown prompt file type"):
        load_prompt_dataset(str(tmp_path / "d.csv"))


def test_render_standard_prompts_follow_the_tokenizer(tokenizers):
    qwen, llama = tokenizers["qwen"], tokenizers["llama"]
    text = "reverse abc"
    ids = render_prompt(qwen, text)
    assert ids == qwen(text, add_special_tokens=False).input_ids and ids
    assert not set(ids) & set(qwen.all_special_ids)  # no BOS
    ids = render_prompt(llama, text)
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    assert ids[1:] == llama(text, add_special_tokens=False).input_ids


def test_render_conversational_prompts_use_the_chat_template(tokenizers):
    qwen, llama = tokenizers["qwen"], tokenizers["llama"]
    messages = CONVERSATIONAL[0]["prompt"]
    ids = render_prompt(qwen, messages)
    assert qwen.decode(ids) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nreverse abc<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = render_prompt(llama, messages)
    assert (
        ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    )  # template's BOS only
    assert llama.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # what a careless tokenize-with-specials would give: the case render_prompt avoids
    text = llama.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert llama(text).input_ids.count(llama.bos_token_id) == 2


def test_render_conversational_without_chat_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(llama_standin(tmp_path / "plain"))
    tok.chat_template = None
    with pytest.raises(
        UserError, match=r"plain'? has no chat_template; conversational prompts need a chat"
    ):
        render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert render_prompt(tok, "hi")[0] == tok.bos_token_id  # standard prompts still work


def _stream(n, seed, epochs):
    """The concatenated epochs, built one whole epoch at a time (no step arithmetic)."""
    return np.concatenate([epoch_order(n, seed, e) for e in range(epochs)])


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(10, 3, 0)
    assert sorted(a) == list(range(10)) and a.dtype == np.int64
    assert np.array_equal(a, epoch_order(10, 3, 0))
    assert not np.array_equal(a, epoch_order(10, 3, 1)) and not np.array_equal(
        a, epoch_order(10, 4, 0)
    )
    with pytest.raises(ValueError):
        a[0] = 5  # the cached permutation cannot be corrupted by a caller


@pytest.mark.parametrize(("n", "batch"), [(10, 4), (7, 7), (5, 12), (1, 3)])
def test_steps_are_consecutive_slices_of_the_epoch_stream(n, batch):
    seed = 11
    steps = 9
    stream = _stream(n, seed, epochs=steps * batch // n + 2)
    for step in range(steps):
        got = indices_for_step(n, seed, step, batch)
        assert got.dtype == np.int64 and got.shape == (batch,)
        assert np.array_equal(got, stream[step * batch : (step + 1) * batch])


def test_a_batch_straddles_the_epoch_boundary():
    n, seed, batch = 10, 5, 4  # step 2 covers positions 8..11: end of epoch 0, start of epoch 1
    got = indices_for_step(n, seed, 2, batch)
    assert list(got[:2]) == list(epoch_order(n, seed, 0)[8:])
    assert list(got[2:]) == list(epoch_order(n, seed, 1)[:2])
    # resume: a fresh call for a later step (nothing cached about earlier steps) continues
    epoch_order.cache_clear()
    assert np.array_equal(indices_for_step(n, seed, 7, batch), _stream(n, seed, 4)[28:32])


def test_task_prompts_follow_the_same_walk():
    class Task:
        num_prompts = 13

    for step in (0, 3, 8):
        assert np.array_equal(
            prompts_for_step(Task(), step, 5, 2), indices_for_step(13, 2, step, 5)
        )


def test_bad_order_arguments():
    for args in [(0, 1, 0, 1), (5, 1, -1, 1), (5, 1, 0, 0)]:
        with pytest.raises(ValueError):
            indices_for_step(*args)


def test_filter_prompts():
    tokens = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    kept, lists, skipped = filter_prompts(tokens, 3, "skip")
    assert list(kept) == [0, 1, 3] and lists == [[1, 2, 3], [4], [10, 11]] and skipped == 1
    kept, lists, skipped = filter_prompts(tokens, 2, "truncate_left")
    assert list(kept) == [0, 1, 2, 3] and lists == [[2, 3], [4], [8, 9], [10, 11]] and skipped == 0
    kept, lists, skipped = filter_prompts(tokens, None, "skip")
    assert list(kept) == [0, 1, 2, 3] and lists == tokens and skipped == 0
    with pytest.raises(UserError, match="'drop' is not one of: skip, truncate_left"):
        filter_prompts(tokens, 3, "drop")
    with pytest.raises(UserError, match="max_prompt_tokens=0"):
        filter_prompts(tokens, 0, "skip")
