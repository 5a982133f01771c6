"""Load and save HF-format causal LM directories (safetensors only, local files only).

Everything that reads a model (the torch engines, `hpcalign rollout`) goes through
`load_model`, so the rules live in one place: no network, no pickle (`use_safetensors`),
eval mode, and a one-line `UserError` naming the path when the directory is not a model.

Tokenizers load with `AutoTokenizer`, exactly as TRL, vLLM and `transformers` users load
them, so hpcalign tokenizes a user's model the way the rest of the ecosystem does (a qwen2
directory becomes a `Qwen2Tokenizer` rebuilt from its vocabulary and merges; the char
tokenizer of `hpcalign init-model` is built to come out the same either way, see
`hpcalign.models.tokenizer`). Special tokens follow the model's own files:

- EOS: the list in `generation_config.json` (Qwen2.5 stops on `<|im_end|>` and
  `<|endoftext|>`), else the tokenizer's `eos_token_id` (`eos_token_ids`);
- padding: the tokenizer's pad token, else the first EOS id, for padding only
  (`padding_id`): padded positions are masked everywhere, so the id never matters.

`save_model(..., source_dir=...)` keeps the user's tokenizer files, config.json and
generation_config.json byte for byte: transformers re-saves a tokenizer in its own layout
(a qwen2 char tokenizer comes back with another pre-tokenizer, a chat template moves from
tokenizer_config.json to chat_template.jinja), and a checkpoint must load in vLLM and
`transformers` exactly as the input did.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpcalign.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED = ("config.json",)
# Files of a model directory that hold weights: written by save_pretrained, never copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".safetensors.index.json", ".bin.index.json")


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


def load_tokenizer(path: str) -> Any:
    """The tokenizer of the model directory `path`, as `AutoTokenizer` loads it (offline)."""
    try:
        # trust_remote_code=False spelled out: a directory's own Python never runs, and
        # transformers never stops to ask on a terminal
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: cannot load the tokenizer ({type(err).__name__}: {err})") from err


def load_model(path: str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
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
            trust_remote_code=False,
            attn_implementation=config.get("attn_implementation", "sdpa"),
        )
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise UserError(f"{path}: cannot load model ({type(err).__name__}: {err})") from err
    return model.eval(), load_tokenizer(path)


def eos_token_ids(model: torch.nn.Module | None, tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends a completion: generation_config's list, else the tokenizer's EOS.

    Raises UserError when neither names one (sampling could then never stop by itself).
    """
    found: list[int] = []
    generation = getattr(model, "generation_config", None) if model is not None else None
    value = getattr(generation, "eos_token_id", None)
    if value is None and model is not None:
        value = getattr(getattr(model, "config", None), "eos_token_id", None)
    if value is not None:
        found = [int(v) for v in (value if isinstance(value, list | tuple) else [value])]
    if not found and getattr(tokenizer, "eos_token_id", None) is not None:
        found = [int(tokenizer.eos_token_id)]
    if not found:
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise UserError(f"{name}: no EOS token (neither generation_config.json's eos_token_id "
                        "nor the tokenizer's eos_token is set)")
    return tuple(dict.fromkeys(found))  # unique, order kept


def padding_id(tokenizer: Any, eos_ids: tuple[int, ...]) -> int:
    """The id padded positions hold: the tokenizer's pad token, else the first EOS id."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(eos_ids[0])


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: str,
               source_dir: str | None = None) -> None:
    """Write `model` to `out_dir` in HF format (safetensors) with its tokenizer.

    With `source_dir` (the directory the model was loaded from), every non-weight file of
    it (tokenizer files, config.json, generation_config.json, chat template, README) is
    copied as is over what transformers wrote, so the output tokenizes and configures
    exactly like the input; `tokenizer` is then unused. Without it (a freshly built model)
    the tokenizer is saved by transformers.
    """
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if source_dir is None:
        tokenizer.save_pretrained(out_dir)
        _record_attn_implementation(out_dir, getattr(model.config, "_attn_implementation", None))
        return
    copy_model_files(source_dir, out_dir)


def copy_model_files(source_dir: str, out_dir: str) -> list[str]:
    """Copy the non-weight top-level files of `source_dir` into `out_dir`; returns their names."""
    copied = []
    for name in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, name)
        if not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES) or name.startswith("."):
            continue
        shutil.copyfile(path, os.path.join(out_dir, name))
        copied.append(name)
    return copied


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
