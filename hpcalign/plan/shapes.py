"""Model shapes and exact parameter counts, from an HF `config.json` or a named preset.

The planner needs only the shape of a decoder (layers, widths, heads, vocabulary, MoE),
never its weights, so a 300B model is planned on a laptop from its `config.json` alone.
Counts follow the module layout of HF Llama/Qwen2/Mixtral (and GPT-3 for the Megatron
papers' shapes); `docs/planner.md` derives each term and lists the published checks
(Llama-2-7B 6.74 B, Llama-2-70B 68.98 B, Llama-3-405B 405.85 B, Mixtral 8x7B 46.7 B).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from hpcalign.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """Shape of a decoder-only transformer; all the planner ever knows about a model."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    """MLP intermediate size (per expert for MoE)."""
    vocab: int
    tied_embeddings: bool = False
    head_dim: int = 0
    """0: hidden // heads."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """swiglu: gate, up, down (3·h·ffn); gelu: up, down with biases (GPT-3)."""
    qkv_bias: bool = False
    """Qwen2 has q/k/v biases; Llama does not."""
    norm: Literal["rms", "layer"] = "rms"
    """RMSNorm has a weight per channel; LayerNorm a weight and a bias."""
    experts: int = 0
    """MoE experts per layer (0: dense)."""
    experts_per_token: int = 0
    """MoE top-k routing (active experts per token)."""
    position_embeddings: int = 0
    """Learned absolute positions (GPT-3: 2048); 0 for rotary."""

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def is_moe(self) -> bool:
        return self.experts > 0


@dataclass(frozen=True)
class ParamCount:
    """Parameters by part; `active` counts only the routed experts a token uses."""

    embedding: int
    output: int
    """Untied output head (0 when tied)."""
    attention_per_layer: int
    mlp_per_layer: int
    """All experts (plus router) for MoE."""
    mlp_active_per_layer: int
    norms_per_layer: int
    final_norm: int
    layers: int
    head_matmul: int
    """vocab · hidden: the logits matmul (with or without tying)."""

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.mlp_per_layer + self.norms_per_layer

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.layers * self.per_layer + self.final_norm

    @property
    def active(self) -> int:
        """Parameters touched per token (equals `total` for dense models)."""
        per_layer = self.attention_per_layer + self.mlp_active_per_layer + self.norms_per_layer
        return self.embedding + self.output + self.layers * per_layer + self.final_norm

    @property
    def matmul_active(self) -> int:
        """Active parameters that take part in a matmul: all but the embedding lookup.

        With tied embeddings the output head still multiplies by the (shared) matrix, so it
        counts here once although it is stored once.
        """
        per_layer = self.attention_per_layer + self.mlp_active_per_layer
        return self.layers * per_layer + self.head_matmul


def count_params(shape: ModelShape) -> ParamCount:
    """Exact parameter count of `shape` (see `docs/planner.md`, "Parameters")."""
    h, d = shape.hidden, shape.d_head
    q_width, kv_width = shape.heads * d, shape.kv_heads * d
    # q, k, v projections (GQA: kv_heads < heads) + output projection
    attention = h * (q_width + 2 * kv_width) + q_width * h
    if shape.qkv_bias:
        attention += q_width + 2 * kv_width
    if shape.mlp == "swiglu":
        expert = 3 * h * shape.ffn
    else:  # gelu: h->ffn and ffn->h with biases, and the attention has biases too (GPT-3)
        expert = 2 * h * shape.ffn + shape.ffn + h
        attention += q_width + 2 * kv_width + h
    if shape.is_moe:
        router = h * shape.experts
        mlp = shape.experts * expert + router
        mlp_active = shape.experts_per_token * expert + router
    else:
        mlp = mlp_active = expert
    norm_params = h if shape.norm == "rms" else 2 * h
    embedding = shape.vocab * h + shape.position_embeddings * h
    return ParamCount(
        embedding=embedding,
        output=0 if shape.tied_embeddings else shape.vocab * h,
        attention_per_layer=attention,
        mlp_per_layer=mlp,
        mlp_active_per_layer=mlp_active,
        norms_per_layer=2 * norm_params,
        final_norm=norm_params,
        layers=shape.layers,
        head_matmul=shape.vocab * h,
    )


# NOTE: shapes as published in each model's HF config.json (Llama 2: Touvron et al. 2023,
# Table 1 / Llama 3: Dubey et al. 2024, Table 3 / GPT-3: Brown et al. 2020, Table 2.1).
PRESETS: dict[str, ModelShape] = {
    "llama2-7b": ModelShape("llama2-7b", 32, 4096, 32, 32, 11008, 32000),
    "llama2-13b": ModelShape("llama2-13b", 40, 5120, 40, 40, 13824, 32000),
    "llama2-70b": ModelShape("llama2-70b", 80, 8192, 64, 8, 28672, 32000),
    "llama3-8b": ModelShape("llama3-8b", 32, 4096, 32, 8, 14336, 128256),
    "llama3-70b": ModelShape("llama3-70b", 80, 8192, 64, 8, 28672, 128256),
    "llama3-405b": ModelShape("llama3-405b", 126, 16384, 128, 8, 53248, 128256),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, qkv_bias=True),
    "mixtral-8x7b": ModelShape(
        "mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, experts=8, experts_per_token=2
    ),
    "gpt3-175b": ModelShape(
        "gpt3-175b",
        96,
        12288,
        96,
        96,
        4 * 12288,
        50257,
        tied_embeddings=True,
        mlp="gelu",
        norm="layer",
        position_embeddings=2048,
    ),
    # The 300B dense shape of hpcalign's 300B+300B study: Llama-3-405B's width (h 16384,
    # 128 query / 8 KV heads of 128, vocab 128256) with 96 layers, which divides by every
    # pipeline size up to 32 except 5 and 7, and FFN 51200 (3.125·h, a multiple of
    # 128·TP for TP ≤ 16): 96 · 3.087 B + 2 · 2.10 B = 300.55 B parameters.
    "dense-300b": ModelShape("dense-300b", 96, 16384, 128, 8, 51200, 128256),
}


def preset(name: str) -> ModelShape:
    """The preset called `name`, or a ConfigError listing the known names."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown model preset {name!r}; expected one of {', '.join(sorted(PRESETS))}"
        )
    return PRESETS[name]


def _need(cfg: dict[str, Any], source: str, *keys: str) -> Any:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    raise ConfigError(f"{source}: missing {keys[0]!r} (an HF decoder config.json has it)")


def shape_from_hf_config(cfg: dict[str, Any], name: str = "hf") -> ModelShape:
    """Shape from the fields of an HF `config.json` (Llama, Qwen2, Mistral, Mixtral, GPT-2).

    Only plain decoder configs are read; multimodal configs keep their text model under
    `text_config`, which is used when present.
    """
    cfg = cfg.get("text_config", cfg)
    model_type = str(cfg.get("model_type", ""))
    hidden = int(_need(cfg, name, "hidden_size", "n_embd", "d_model"))
    heads = int(_need(cfg, name, "num_attention_heads", "n_head"))
    gpt2 = model_type == "gpt2"
    ffn = cfg.get("intermediate_size") or cfg.get("n_inner") or (4 * hidden if gpt2 else None)
    if ffn is None:
        raise ConfigError(f"{name}: missing 'intermediate_size' (an HF decoder config.json has it)")
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    return ModelShape(
        name=name,
        layers=int(_need(cfg, name, "num_hidden_layers", "n_layer")),
        hidden=hidden,
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        ffn=int(cfg.get("moe_intermediate_size") or ffn) if experts else int(ffn),
        vocab=int(_need(cfg, name, "vocab_size")),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", gpt2)),
        head_dim=int(cfg.get("head_dim") or 0),
        mlp="gelu" if gpt2 else "swiglu",
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        norm="layer" if gpt2 else "rms",
        experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or (2 if experts else 0)),
        position_embeddings=int(cfg.get("n_positions", 0)) if gpt2 else 0,
    )


def load_hf_config(path: str | Path) -> ModelShape:
    """Shape from a `config.json` file or an HF model directory holding one."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file (expected an HF config.json)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from None
    return shape_from_hf_config(cfg, name=path.name if path.is_dir() else path.parent.name)


def with_name(shape: ModelShape, name: str) -> ModelShape:
    return replace(shape, name=name)
