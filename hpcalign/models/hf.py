"""Load and save the policy as an HF-format directory (safetensors only, local files only).

Everything that reads a model (trainer, generator, `hpcalign rollout`) goes through
`load_model`, so the rules live in one place: no network, no pickle (`use_safetensors`),
eval mode, and a one-line `UserError` naming the path when the directory is not a model.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hpcalign.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED = ("config.json", "tokenizer.json")


def _check_model_dir(path: str) -> dict:
    if not os.path.isdir(path):
        raise UserError(f"{path}: model directory does not exist")
    missing = [name for name in _REQUIRED if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise UserError(
            f"{path}: not an HF model directory (missing {', '.join(missing)}); "
            "create one with 'hpcalign init-model DIR'"
        )
    files = os.listdir(path)
    if not any(name.endswith(".safetensors") for name in files):
        raise UserError(
            f"{path}: no *.safetensors weights (pickled .bin checkpoints are refused; "
            "convert them with save_pretrained(..., safe_serialization=True))"
        )
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}/config.json: unreadable ({err})") from err


def load_model(path: str, dtype: str = "float32") -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """The causal LM and tokenizer stored in `path`, on CPU, in eval mode."""
    if dtype not in _DTYPES:
        raise UserError(f"dtype '{dtype}' is not one of {sorted(_DTYPES)}")
    config = _check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=_DTYPES[dtype],
            local_files_only=True,
            use_safetensors=True,
            attn_implementation=config.get("attn_implementation", "sdpa"),
        )
        # NOTE: the saved tokenizer.json pipeline as is; AutoTokenizer would rebuild a qwen2
        # dir's tokenizer as Qwen2Tokenizer (see hpcalign.models.tokenizer).
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise UserError(f"{path}: cannot load model ({type(err).__name__}: {err})") from err
    return model.eval(), tokenizer


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out_dir: str) -> None:
    """Write `model` and `tokenizer` to `out_dir` in HF format with safetensors weights."""
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _record_attn_implementation(out_dir, getattr(model.config, "_attn_implementation", None))


def _record_attn_implementation(out_dir: str, attn_implementation: str | None) -> None:
    """Keep the attention kernel in config.json (transformers drops it when saving)."""
    if not attn_implementation:
        return
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["attn_implementation"] = attn_implementation
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
