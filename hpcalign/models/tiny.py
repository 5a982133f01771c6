"""Build a tiny, randomly initialised HF causal LM with a character tokenizer.

`hpcalign init-model` and `model.init` use this so a quickstart (and every test) runs with
no download: the result is an ordinary HF model directory (config.json, model.safetensors,
tokenizer.json) that `hpcalign.models.hf.load_model`, `AutoModelForCausalLM` and vLLM load.

The directory appears atomically: everything is written into a temporary sibling
directory that is renamed into place at the end, so a crash never leaves a half-written
model where a run would pick it up.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hpcalign.config.schema import ModelInit
from hpcalign.models.hf import save_model
from hpcalign.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_char_tokenizer

# 26 letters + 10 digits + 4 punctuation = 40 symbols; with the 4 specials the vocab is 44.
DEFAULT_SYMBOLS: str = string.ascii_lowercase + string.digits + "=+ :"

# NOTE: measured at the GRPO benchmark shape (hidden 256, 4 layers; tools/bench/sampler.py,
# 1 thread, CPU seconds on a shared 2-core machine): 64 x 32 KV-cache sampling took
# 0.34-0.38 s with "eager" and 0.36-0.41 s with "sdpa" over several runs, forward + backward
# of 64 x 40 tokens 0.73 s with both: a tie within noise, eager slightly ahead for sampling
# (the attention matrices are tiny). Bigger models (and vLLM / megatron, which ignore this
# setting) want "sdpa" or flash attention.
ATTN_IMPLEMENTATION = "eager"

_ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def model_config(init: ModelInit, vocab_size: int) -> Qwen2Config | LlamaConfig:
    """The HF config of the tiny model (head_dim = hidden / heads)."""
    if init.hidden % init.heads:
        raise ValueError(f"hidden={init.hidden} must be a multiple of heads={init.heads}")
    if init.heads % init.kv_heads:
        raise ValueError(f"kv_heads={init.kv_heads} must divide heads={init.heads}")
    config_cls, _ = _ARCHS[init.arch]
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=init.hidden,
        intermediate_size=init.intermediate,
        num_hidden_layers=init.layers,
        num_attention_heads=init.heads,
        num_key_value_heads=init.kv_heads,
        head_dim=init.hidden // init.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=init.tie_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation=ATTN_IMPLEMENTATION,
        dtype="float32",
    )


def build_model(init: ModelInit, vocab_size: int) -> torch.nn.Module:
    """A freshly initialised model; the same `init.seed` gives bitwise-identical weights."""
    config = model_config(init, vocab_size)
    _, model_cls = _ARCHS[init.arch]
    # NOTE: a private generator state via fork_rng so building a model does not reseed the
    # caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init.seed)
        model = model_cls(config)
    return model.eval()


def init_model(
    out_dir: str, init: ModelInit, symbols: str = DEFAULT_SYMBOLS, *, overwrite: bool = False
) -> None:
    """Write a tiny model + char tokenizer to `out_dir` (mode 0700) atomically.

    An existing non-empty `out_dir` is an error unless `overwrite`; then the old directory
    is replaced only after the new one is complete.
    """
    out_dir = os.path.abspath(out_dir)
    exists = os.path.lexists(out_dir)
    if exists and not overwrite and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    tokenizer = build_char_tokenizer(symbols)
    model = build_model(init, len(tokenizer))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        os.chmod(tmp_dir, 0o700)
        save_model(model, tokenizer, tmp_dir)
        if exists and overwrite:
            # NOTE: move the old dir aside first (rename cannot replace a non-empty dir), so a
            # complete model sits at out_dir at every moment except between the two renames.
            old_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old_dir, "model"))
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.rename(tmp_dir, out_dir)  # atomic; also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
