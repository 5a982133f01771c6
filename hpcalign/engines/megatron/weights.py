"""HF safetensors names <-> megatron GPT state dicts, for any TP x PP layout.

Three forms of the same weights:
- **HF**: `model.layers.3.self_attn.q_proj.weight`, ... (what transformers, vLLM and the
  torch engines load by name);
- **global megatron**: megatron's names with *global* layer numbers and whole tensors
  (the TP=1, PP=1 state dict of `GPTModel`), the vocabulary padded;
- **local megatron**: one rank's state dict: its PP stage's layers renumbered from 0,
  its TP shard of every split tensor.

The mappings (checked numerically against HF's forward in the tests):
- fused QKV is interleaved per key/value group, `[q heads of group g; k_g; v_g]` stacked
  along dim 0 (bias likewise), so a TP shard of it is a run of whole groups;
- `linear_fc1` = `cat(gate_proj, up_proj)` for SwiGLU, and a TP shard of it is
  `cat(gate shard, up shard)` (not a slice of the whole);
- column-parallel tensors (QKV, fc1, embedding, output layer) split along dim 0,
  row-parallel ones (attention output `linear_proj`, `linear_fc2`) along dim 1;
- the vocabulary is padded with zero rows to `GptShape.padded_vocab(tp)`; `to_hf` cuts
  them off, so padding never reaches an HF checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from hpcalign.engines.megatron.model import GptShape

Tensors = dict[str, torch.Tensor]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# megatron suffix -> HF suffix for tensors that map 1:1
_ONE_TO_ONE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_COLUMN_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                    "embedding.word_embeddings.weight", "output_layer.weight")


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: GptShape) -> torch.Tensor:
    groups, per_group, d = shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim
    tail = q.shape[1:]  # (hidden,) for weights, () for biases
    fused = torch.cat([q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail),
                       v.reshape(groups, d, *tail)], dim=1)
    return fused.reshape(groups * (per_group + 2) * d, *tail)


def _split_qkv(fused: torch.Tensor, shape: GptShape) -> tuple[torch.Tensor, ...]:
    groups, per_group, d = shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim
    tail = fused.shape[1:]
    grouped = fused.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (q.reshape(groups * per_group * d, *tail), k.reshape(groups * d, *tail),
            v.reshape(groups * d, *tail))


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] == rows:
        return weight
    pad = torch.zeros(rows - weight.shape[0], *weight.shape[1:], dtype=weight.dtype)
    return torch.cat([weight, pad])


def hf_to_global(hf: Mapping[str, torch.Tensor], shape: GptShape, padded_vocab: int) -> Tensors:
    """HF names -> global megatron state dict (whole tensors, vocabulary padded)."""
    out: Tensors = {"embedding.word_embeddings.weight":
                    _pad_rows(hf["model.embed_tokens.weight"], padded_vocab),
                    "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not shape.tied:
        out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], padded_vocab)
    for layer in range(shape.layers):
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        for mg, name in _ONE_TO_ONE.items():
            out[dst + mg] = hf[src + name]
        attn = src + "self_attn."
        out[dst + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"],
            shape)
        if shape.qkv_bias:
            out[dst + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"],
                shape)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
    return out


def _layer_to_hf(mg: Mapping[str, torch.Tensor], layer: int, shape: GptShape) -> Tensors:
    """Global layer `layer`'s megatron tensors -> its HF tensors (QKV split, gate/up split)."""
    src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    out: Tensors = {}
    for name, hf_name in _ONE_TO_ONE.items():
        out[dst + hf_name] = mg[src + name]
    q, k, v = _split_qkv(mg[src + "self_attention.linear_qkv.weight"], shape)
    out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v})
    if shape.qkv_bias:
        q, k, v = _split_qkv(mg[src + "self_attention.linear_qkv.bias"], shape)
        out.update({dst + "self_attn.q_proj.bias": q, dst + "self_attn.k_proj.bias": k,
                    dst + "self_attn.v_proj.bias": v})
    gate, up = torch.chunk(mg[src + "mlp.linear_fc1.weight"], 2)
    out.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up})
    return out


def global_to_hf(mg: Mapping[str, torch.Tensor], shape: GptShape) -> Tensors:
    """Global megatron state dict -> HF names (vocabulary padding cut off; tied head once)."""
    out: Tensors = {"model.embed_tokens.weight":
                    mg["embedding.word_embeddings.weight"][: shape.vocab],
                    "model.norm.weight": mg["decoder.final_layernorm.weight"]}
    for layer in range(shape.layers):
        out.update(_layer_to_hf(mg, layer, shape))
    if not shape.tied:
        out["lm_head.weight"] = mg["output_layer.weight"][: shape.vocab]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def unit_to_hf(mg: Mapping[str, torch.Tensor], names: list[str], shape: GptShape) -> Tensors:
    """One unit of `sync_units` (its global megatron tensors in `mg`) -> its HF tensors,
    by the same mapping as `global_to_hf` (which is these units put together)."""
    out: Tensors = {}
    layers: list[int] = []
    for name in names:
        match = _LAYER.match(name)
        if match:
            if int(match.group(1)) not in layers:
                layers.append(int(match.group(1)))
        elif name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = mg[name][: shape.vocab]
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = mg[name]
        elif name == "output_layer.weight":
            out["lm_head.weight"] = mg[name][: shape.vocab]
        else:
            raise KeyError(f"no HF name for megatron tensor {name!r}")
    for layer in layers:
        out.update(_layer_to_hf(mg, layer, shape))
    return {name: tensor.contiguous() for name, tensor in out.items()}


def sync_units(shape: GptShape, pp: int) -> list[tuple[int, list[str]]]:
    """The model as (PP stage, global megatron names) units, the order weights travel in:
    the embedding, one unit per layer, then the final norm (and an untied head). A unit is
    what a rank holds whole at a time when the model is sent or saved layer by layer."""
    units: list[tuple[int, list[str]]] = []
    for stage in range(pp):
        current: list[str] = []
        key: object = None
        for name in global_names_of_stage(shape, pp, stage):
            match = _LAYER.match(name)
            unit_key = int(match.group(1)) if match else (
                "embedding" if name.startswith("embedding.") else "final")
            if current and unit_key != key:
                units.append((stage, current))
                current = []
            key = unit_key
            current.append(name)
        if current:
            units.append((stage, current))
    return units


def _suffix(name: str) -> str:
    match = _LAYER.match(name)
    return match.group(2) if match else name


def shard(tensor: torch.Tensor, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """The TP shard `tp_rank` of the global tensor `name`."""
    suffix = _suffix(name)
    if tp == 1:
        return tensor
    if suffix == "mlp.linear_fc1.weight":
        gate, up = torch.chunk(tensor, 2)
        return torch.cat([torch.chunk(gate, tp)[tp_rank], torch.chunk(up, tp)[tp_rank]])
    if suffix in _COLUMN_PARALLEL:
        return torch.chunk(tensor, tp, dim=0)[tp_rank]
    if suffix in _ROW_PARALLEL:
        return torch.chunk(tensor, tp, dim=1)[tp_rank]
    return tensor  # norms: replicated


def tp_split(name: str) -> bool:
    """Whether tensor `name` is split over TP ranks (else every TP rank holds it whole)."""
    suffix = _suffix(name)
    return suffix == "mlp.linear_fc1.weight" or suffix in _COLUMN_PARALLEL + _ROW_PARALLEL


def unshard(shards: list[torch.Tensor], name: str) -> torch.Tensor:
    """The global tensor `name` from its TP shards in rank order (inverse of `shard`)."""
    suffix = _suffix(name)
    if len(shards) == 1:
        return shards[0]
    if suffix == "mlp.linear_fc1.weight":
        halves = [torch.chunk(s, 2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if suffix in _COLUMN_PARALLEL:
        return torch.cat(shards, dim=0)
    if suffix in _ROW_PARALLEL:
        return torch.cat(shards, dim=1)
    return shards[0]


def stage_layers(shape: GptShape, pp: int, pp_rank: int) -> range:
    """Global layer numbers of PP stage `pp_rank` (equal split: check_layout holds)."""
    per_stage = shape.layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def local_name(global_name: str, first_layer: int) -> str:
    match = _LAYER.match(global_name)
    if not match:
        return global_name
    return f"decoder.layers.{int(match.group(1)) - first_layer}.{match.group(2)}"


def global_name(local: str, first_layer: int) -> str:
    match = _LAYER.match(local)
    if not match:
        return local
    return f"decoder.layers.{int(match.group(1)) + first_layer}.{match.group(2)}"


def global_names_of_stage(shape: GptShape, pp: int, pp_rank: int) -> list[str]:
    """The global megatron names stage `pp_rank` holds, in a fixed order (every rank
    derives the same list, so tensors can travel by position)."""
    layers = stage_layers(shape, pp, pp_rank)
    names = []
    if pp_rank == 0:
        names.append("embedding.word_embeddings.weight")
    per_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight"]
    per_layer += ["self_attention.linear_qkv.bias"] if shape.qkv_bias else []
    per_layer += ["self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
                  "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    names += [f"decoder.layers.{layer}.{suffix}" for layer in layers for suffix in per_layer]
    if pp_rank == pp - 1:
        names.append("decoder.final_layernorm.weight")
        if not shape.tied:
            names.append("output_layer.weight")
    return names


def local_state(global_sd: Mapping[str, torch.Tensor], shape: GptShape, *, tp: int,
                tp_rank: int, pp: int, pp_rank: int) -> Tensors:
    """One rank's state dict (local names, TP shards) from the global state dict.

    With tied embeddings and PP > 1 the last stage holds its own copy of the embedding as
    `output_layer.weight` (megatron keeps the two equal by all-reducing their gradients).
    """
    first = stage_layers(shape, pp, pp_rank).start
    out = {local_name(name, first): shard(global_sd[name], name, tp, tp_rank)
           for name in global_names_of_stage(shape, pp, pp_rank)}
    if shape.tied and pp > 1 and pp_rank == pp - 1:
        out["output_layer.weight"] = shard(global_sd["embedding.word_embeddings.weight"],
                                           "embedding.word_embeddings.weight", tp, tp_rank)
    return out


def global_shapes(shape: GptShape, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of the global megatron state dict."""
    h, d = shape.hidden, shape.head_dim
    qkv = (shape.heads + 2 * shape.kv_heads) * d
    per_layer = {"input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (qkv, h),
                 "self_attention.linear_qkv.bias": (qkv,),
                 "self_attention.linear_proj.weight": (h, shape.heads * d),
                 "pre_mlp_layernorm.weight": (h,), "mlp.linear_fc1.weight": (2 * shape.ffn, h),
                 "mlp.linear_fc2.weight": (h, shape.ffn)}
    out = {"embedding.word_embeddings.weight": (padded_vocab, h),
           "decoder.final_layernorm.weight": (h,), "output_layer.weight": (padded_vocab, h)}
    for layer in range(shape.layers):
        out.update({f"decoder.layers.{layer}.{k}": v for k, v in per_layer.items()})
    return out
