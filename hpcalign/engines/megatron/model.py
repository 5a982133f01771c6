"""An HF Llama / Qwen2 `config.json` as a megatron-core GPT model (local spec, no TE).

`GptShape.from_hf_config` reads the fields that matter (GQA, SwiGLU, RMSNorm, RoPE, tied
or untied embeddings, Qwen2's q/k/v bias) and refuses what the mapping does not express
(RoPE scaling, sliding windows, other activations) with a `UserError` naming the field,
instead of building a model that silently computes something else. `build_gpt_model`
builds this rank's part of it for the current megatron parallel state: TP shards,
the PP stage's layers, the vocabulary padded to a multiple of TP x 128.

    shape = GptShape.from_hf_dir(model_dir)
    model = build_gpt_model(shape, tp=2, pp=1, dtype=torch.float32)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hpcalign.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
VOCAB_MULTIPLE = 128  # megatron's make_vocab_size_divisible_by, times TP


@dataclass(frozen=True, slots=True)
class GptShape:
    """The architecture of one decoder-only model, in the terms both sides share."""

    model_type: str
    vocab: int  # the HF (unpadded) vocabulary
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    norm_eps: float
    rope_theta: float
    max_positions: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_hf_dir(cls, model_dir: str) -> GptShape:
        path = os.path.join(model_dir, "config.json")
        try:
            with open(path) as handle:
                return cls.from_hf_config(json.load(handle))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: cannot read the model config ({err})") from err

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> GptShape:
        kind = config.get("model_type")
        if kind not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"config.json model_type={kind!r}: the megatron engine maps "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} only")
        if config.get("hidden_act", "silu") != "silu":
            raise UserError(f"config.json hidden_act={config['hidden_act']!r}: expected "
                            "'silu' (SwiGLU)")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UserError(f"config.json rope_type={rope_type!r}: only plain RoPE ('default') "
                            "is mapped to megatron")
        if config.get("use_sliding_window"):
            raise UserError("config.json use_sliding_window=true: sliding-window attention "
                            "is not mapped to megatron")
        if config.get("mlp_bias"):
            raise UserError("config.json mlp_bias=true: MLP biases are not mapped to megatron")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        qkv_bias = kind == "qwen2" or bool(config.get("attention_bias", False))
        return cls(
            model_type=kind,
            vocab=int(config["vocab_size"]),
            hidden=hidden,
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            ffn=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            max_positions=int(config.get("max_position_embeddings", 4096)),
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
        )

    def padded_vocab(self, tp: int) -> int:
        """The vocabulary rounded up to a multiple of tp x 128 (equal shards per TP rank)."""
        multiple = VOCAB_MULTIPLE * tp
        return -(-self.vocab // multiple) * multiple

    def check_layout(self, tp: int, pp: int) -> None:
        """UserError unless this model splits into `tp` x `pp` (heads, groups, layers)."""
        problems = []
        if self.heads % tp:
            problems.append(f"num_attention_heads={self.heads} is not a multiple of tp={tp}")
        if self.kv_heads % tp:
            problems.append(f"num_key_value_heads={self.kv_heads} is not a multiple of tp={tp} "
                            "(each TP rank holds whole key/value groups)")
        if self.ffn % tp:
            problems.append(f"intermediate_size={self.ffn} is not a multiple of tp={tp}")
        if self.layers % pp:
            problems.append(f"num_hidden_layers={self.layers} is not a multiple of pp={pp}")
        if problems:
            raise UserError("model does not split over this layout: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def transformer_config(shape: GptShape, *, tp: int, pp: int, dtype: torch.dtype) -> Any:
    """The megatron TransformerConfig of `shape` for the layout tp x pp, no fused kernels."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = cat(gate, up)
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # NOTE: no fused kernels: they need apex / Transformer Engine / CUDA, and the
        # unfused paths are what the numerical parity with HF is checked on.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # NOTE: weights come from a checkpoint, but the random init must still run:
        # megatron 0.16 sets the `tensor_model_parallel` attributes of TP-split weights
        # only inside its init functions, and without them the grad norm counts those
        # weights on TP rank 0 only (measured: TP=2 norm 3.82 for TP=1's 5.39). On the
        # CPU it runs in megatron's CPU-init path (torch's CPU generator, forked away).
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        # losses are already normalised for the global batch by the loss function:
        # megatron must neither divide by micro-batches nor average over DP
        calculate_per_token_loss=True,
    )


def build_gpt_model(shape: GptShape, *, tp: int, pp: int, dtype: torch.dtype,
                    padded_vocab: int | None = None) -> Any:
    """This rank's GPTModel (its TP shard and PP stage) under the current parallel state."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from hpcalign.engines.megatron.compat import cpu_factories

    shape.check_layout(tp, pp)
    config = transformer_config(shape, tp=tp, pp=pp, dtype=dtype)
    with cpu_factories(), torch.random.fork_rng(devices=[]):
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=padded_vocab or shape.padded_vocab(tp),
            max_sequence_length=shape.max_positions,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=True,  # logits stay vocab-sharded over TP
            share_embeddings_and_output_weights=shape.tied,
            position_embedding_type="rope",
            rotary_base=shape.rope_theta,  # type: ignore[arg-type]  (a float works)
            rotary_percent=1.0,
        )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model.to(dtype)
