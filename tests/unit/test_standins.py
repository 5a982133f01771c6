"""Stand-in user models: they load with the plain HF Auto classes and keep each family's
conventions (BOS, pad, EOS list, chat template) that the data and generation code rely on."""

from __future__ import annotations

import json
import os

import pytest
import torch
from standins import llama_standin, nopad_standin, qwen_standin
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse abc"}]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_qwen_standin(tmp_path):
    path = qwen_standin(tmp_path / "qwen")
    assert path == str(tmp_path / "qwen")
    model, tok = _load(path)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert 300 <= len(tok) <= 500 and model.config.vocab_size == len(tok)
    im_end, eot = (
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    assert tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert model.generation_config.eos_token_id == [im_end, eot]
    assert model.config.eos_token_id == [im_end, eot]
    ids = tok("reverse abc").input_ids
    assert tok.decode(ids) == "reverse abc"
    assert not set(ids) & set(tok.all_special_ids)  # adds nothing, not even EOS
    assert len(ids) < len("reverse abc")  # BPE merges were learned
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nreverse abc<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "chat_template" in json.load(open(os.path.join(path, "tokenizer_config.json")))
    assert tok.convert_tokens_to_ids(tok.tokenize("<|im_start|>")) == [
        tok.convert_tokens_to_ids("<|im_start|>")
    ]


def test_qwen_saved_pipeline_matches_autotokenizer_rebuild(tmp_path):
    # AutoTokenizer rebuilds a qwen2 dir as Qwen2Tokenizer; hpcalign loads tokenizer.json as is
    path = qwen_standin(tmp_path / "qwen")
    auto, saved = AutoTokenizer.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    for text in ("Hello world!  12+7=19\n", "<|im_start|>user\nhi<|im_end|>", "ÜnïcΘde 😀"):
        assert auto(text).input_ids == saved(text).input_ids
    assert saved.chat_template == auto.chat_template is not None


def test_qwen_standin_bfloat16_and_shape_and_seed(tmp_path):
    path = qwen_standin(tmp_path / "q", dtype="bfloat16", hidden=128, layers=3, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 3
    assert any(name.endswith(".safetensors") for name in os.listdir(path))
    a = AutoModelForCausalLM.from_pretrained(qwen_standin(tmp_path / "a", seed=1))
    b = AutoModelForCausalLM.from_pretrained(qwen_standin(tmp_path / "b", seed=1))
    c = AutoModelForCausalLM.from_pretrained(qwen_standin(tmp_path / "c", seed=2))
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(ValueError, match="dtype"):
        qwen_standin(tmp_path / "bad", dtype="float8")


def test_llama_standin(tmp_path):
    model, tok = _load(llama_standin(tmp_path / "llama"))
    assert type(model).__name__ == "LlamaForCausalLM"
    bos, eos, pad = (tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, pad)
    ids = tok("reverse abc").input_ids
    assert ids[0] == bos and ids.count(bos) == 1 and eos not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "reverse abc"
    assert tok("reverse abc", add_special_tokens=False).input_ids == ids[1:]
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>")
    assert (
        text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        and text.count("<s>") == 1
    )
    assert model.generation_config.eos_token_id == [eos, tok.convert_tokens_to_ids("<|eot_id|>")]


def test_nopad_standin(tmp_path):
    model, tok = _load(nopad_standin(tmp_path / "nopad"))
    assert tok.pad_token is None and tok.pad_token_id is None
    assert model.config.pad_token_id is None
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end and model.generation_config.eos_token_id == [im_end]
    assert (
        tok.apply_chat_template(MESSAGES[1:], tokenize=False)
        == "<|im_start|>user\nreverse abc<|im_end|>\n"
    )


def test_standin_models_run(tmp_path):
    for build in (qwen_standin, llama_standin):
        model, tok = _load(build(tmp_path / build.__name__))
        ids = torch.tensor([tok("add 2+3=").input_ids])
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
