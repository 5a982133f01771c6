"""Parameter counts against hand arithmetic and published model sizes."""

from __future__ import annotations

import json

import pytest

from hpcalign.errors import ConfigError
from hpcalign.plan.shapes import ModelShape, count_params, load_hf_config, preset

# Published totals: Llama 2 (Touvron et al. 2023) 6.74 B / 13.02 B / 68.98 B as in the
# issue and HF model cards; Llama 3 / 3.1 HF safetensors totals 8.03 B, 70.55 B, 405.85 B;
# Qwen2.5-7B model card 7.61 B; Mixtral 8x7B (Mistral AI 2023) 46.7 B total, 12.9 B active.
PUBLISHED = {
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.02e9,
    "llama2-70b": 68.98e9,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.55e9,
    "llama3-405b": 405.85e9,
    "qwen2.5-7b": 7.61e9,
    "mixtral-8x7b": 46.7e9,
}


@pytest.mark.parametrize("name,published", PUBLISHED.items())
def test_published_param_counts_within_half_percent(name: str, published: float) -> None:
    total = count_params(preset(name)).total
    assert abs(total - published) / published < 0.005, f"{name}: {total / 1e9:.3f} B"


def test_mixtral_active_params() -> None:
    assert abs(count_params(preset("mixtral-8x7b")).active - 12.9e9) / 12.9e9 < 0.005


def test_llama2_7b_by_hand() -> None:
    # V·h twice (untied) + 32 · (4·h² attention + 3·h·ffn SwiGLU + 2·h norms) + h
    h, ffn, v, layers = 4096, 11008, 32000, 32
    expected = 2 * v * h + layers * (4 * h * h + 3 * h * ffn + 2 * h) + h
    assert count_params(preset("llama2-7b")).total == expected == 6_738_415_616


def test_gqa_attention_by_hand() -> None:
    # Llama-2-70B attention: h·(n_q + 2·n_kv)·d + n_q·d·h with 64 query, 8 KV heads of 128
    counts = count_params(preset("llama2-70b"))
    assert counts.attention_per_layer == 8192 * (64 + 16) * 128 + 64 * 128 * 8192


def test_gpt3_matches_megatron_formula() -> None:
    # Narayanan et al. 2021, eq. (2): P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h))
    layers, h, v, s = 96, 12288, 50257, 2048
    megatron = 12 * layers * h**2 * (1 + 13 / (12 * h) + (v + s) / (12 * layers * h))
    total = count_params(preset("gpt3-175b")).total
    assert abs(total - megatron) / megatron < 1e-6  # differs only by the final LayerNorm


def test_tied_embeddings_counted_once() -> None:
    untied = ModelShape("a", 2, 64, 4, 4, 128, 100)
    tied = ModelShape("a", 2, 64, 4, 4, 128, 100, tied_embeddings=True)
    assert count_params(untied).total - count_params(tied).total == 100 * 64
    # the logits matmul is done either way
    assert count_params(tied).matmul_active == count_params(untied).matmul_active


def test_dense_300b_preset_is_300b() -> None:
    assert abs(count_params(preset("dense-300b")).total - 300.56e9) / 300.56e9 < 1e-3


def test_hf_config_llama(tmp_path) -> None:
    cfg = {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = load_hf_config(tmp_path)
    assert count_params(shape).total == count_params(preset("llama2-70b")).total


def test_hf_config_qwen2_has_qkv_bias_and_moe(tmp_path) -> None:
    qwen = {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    }
    file = tmp_path / "qwen.json"
    file.write_text(json.dumps(qwen))
    assert count_params(load_hf_config(file)).total == count_params(preset("qwen2.5-7b")).total
    mixtral = {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 32000,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    }
    file.write_text(json.dumps(mixtral))
    assert count_params(load_hf_config(file)).total == count_params(preset("mixtral-8x7b")).total


def test_hf_config_errors_name_the_field(tmp_path) -> None:
    file = tmp_path / "config.json"
    file.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        load_hf_config(file)
    with pytest.raises(ConfigError, match="no such file"):
        load_hf_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="llama2-7b"):
        preset("llama-7b")
