"""Tiny model building (`models.tiny`) and HF loading/saving (`models.hf`)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from hpcalign.config.schema import ModelInit
from hpcalign.errors import UserError
from hpcalign.models.hf import load_model, save_model
from hpcalign.models.tiny import DEFAULT_SYMBOLS, build_model, init_model

SMALL = ModelInit(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, seed=3)


def test_default_symbols_give_vocab_44():
    assert len(DEFAULT_SYMBOLS) == 40 and len(set(DEFAULT_SYMBOLS)) == 40
    assert set("=+ :") <= set(DEFAULT_SYMBOLS)


def test_init_model_writes_a_complete_private_dir(tmp_path):
    out = tmp_path / "m"
    init_model(str(out), SMALL)
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert os.listdir(tmp_path) == ["m"]  # no temp dir left behind
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["vocab_size"] == 44
    assert config["head_dim"] == 32 // 4
    assert config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is True
    assert config["attn_implementation"] in ("sdpa", "eager")


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        init_model(str(tmp_path / name), SMALL.model_copy(update={"seed": seed}))
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_untied_llama_has_its_own_head():
    model = build_model(ModelInit(arch="llama", hidden=32, layers=1, intermediate=64,
                                  tie_embeddings=False), vocab_size=44)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    tied = build_model(SMALL, vocab_size=44)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


def test_init_model_refuses_existing_dir_unless_overwrite(tmp_path):
    out = str(tmp_path / "m")
    init_model(out, SMALL)
    with pytest.raises(FileExistsError):
        init_model(out, SMALL)
    init_model(out, SMALL.model_copy(update={"layers": 2}), overwrite=True)
    assert json.loads(open(os.path.join(out, "config.json")).read())["num_hidden_layers"] == 2
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_load_model_round_trip_and_autotokenizer_agree(tmp_path):
    out = str(tmp_path / "m")
    init_model(out, SMALL)
    model, tok = load_model(out)
    assert not model.training
    reference = build_model(SMALL, vocab_size=44)
    ids = torch.tensor([[1, 4, 5, 6, 40]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    text = "abc= 12+3:z"
    # a qwen2 dir makes AutoTokenizer build a Qwen2Tokenizer: it must still agree
    assert AutoTokenizer.from_pretrained(out).encode(text) == tok.encode(text)
    assert tok.encode(text) == [1] + [4 + DEFAULT_SYMBOLS.index(c) for c in text]  # <bos> once

    model.lm_head.weight.data.mul_(2)  # tied: changes the embedding too
    save_model(model, tok, str(tmp_path / "saved"))
    again, _ = load_model(str(tmp_path / "saved"))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert load_model(out, "bfloat16")[0].lm_head.weight.dtype == torch.bfloat16


def test_load_model_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not an HF model directory"):
        load_model(str(tmp_path))
    out = tmp_path / "m"
    init_model(str(out), SMALL)
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[:100])  # truncated copy
    with pytest.raises(UserError, match=f"{out}: cannot load model"):
        load_model(str(out))
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors"):
        load_model(str(out))
    with pytest.raises(UserError, match="dtype"):
        load_model(str(out), "float64")
