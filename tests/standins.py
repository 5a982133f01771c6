"""Stand-ins for the models TRL users bring: tiny Qwen2 / Llama directories, built locally.

Tests of "bring your own HF model and dataset" need directories that look like the real
thing from the outside (what `AutoModelForCausalLM` / `AutoTokenizer` see): a byte-level
BPE tokenizer with the family's special tokens, BOS convention and chat template,
`generation_config.json` with the family's EOS list, safetensors weights. Nothing is
downloaded: the BPE is trained in-process on a small fixed corpus (~0.1 s, once per process)
and the models are random 2-layer transformers (hidden 64).

    from standins import qwen_standin             # tests/ is on sys.path (its conftest.py)
    path = qwen_standin(tmp_path / "qwen")        # -> str(path), ready for from_pretrained

The three families differ where real models differ, which is what user code trips on:
- `qwen_standin`: no BOS (encoding adds nothing), `<|endoftext|>` is pad, ChatML template,
  generation stops at `<|im_end|>` or `<|endoftext|>`. Saved as `Qwen2Tokenizer` so
  `AutoTokenizer` rebuilds it from vocab + merges exactly as it rebuilds a real Qwen's.
- `llama_standin`: a TemplateProcessing post-processor adds `<s>` once in front of every
  encoding, `</s>` EOS, `<pad>` pad, a Llama-3-shaped template that itself starts with
  `<s>` (so tokenizing a rendered chat with special tokens on would double the BOS).
- `nopad_standin`: Qwen-like with no pad token at all and a single EOS.
"""

from __future__ import annotations

import functools
import json
import os

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

VOCAB_SIZE = 400  # 256 byte symbols + specials + ~140 merges

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA_SPECIALS = ("<s>", "</s>", "<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Qwen2.5's template without tools or the default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama-3's shape: BOS once, then header-delimited turns ending in <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _corpus() -> list[str]:
    """A few hundred short lines in the style of the tests' prompts (fixed, no randomness)."""
    words = [
        "reverse",
        "add",
        "the",
        "answer",
        "is",
        "think",
        "question",
        "what",
        "sum",
        "of",
        "and",
        "letters",
        "digits",
        "please",
        "solve",
        "step",
        "by",
        "hello",
        "world",
    ]
    lines = [f"{w} {v}" for w in words for v in words[:8]]
    lines += [f"{a}+{b}={a + b}" for a in range(0, 40, 3) for b in range(0, 40, 7)]
    lines += [f"reverse {w} -> {w[::-1]}" for w in ("abc", "hello", "world", "letters", "qwerty")]
    lines += [
        "abcdefghijklmnopqrstuvwxyz",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        "<think> 2 + 2 </think> <answer> 4 </answer>",
        "#### 42",
        "\\boxed{7}",
        "system user assistant",
        "You are a helpful assistant.",
    ]
    return lines


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # NOTE: exactly Qwen2Tokenizer's pipeline, so AutoTokenizer's rebuild of a qwen2
    # directory gives the same ids as the saved tokenizer.json.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@functools.lru_cache(maxsize=4)
def _trained_bpe(specials: tuple[str, ...]) -> str:
    """tokenizer.json text of a byte-level BPE trained on `_corpus()`; specials get ids 0.."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def _vocab_and_merges(specials: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(_trained_bpe(specials))["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")


def _save_model(
    model: torch.nn.Module,
    path: str,
    dtype: str,
    eos_ids: list[int],
    pad_id: int | None,
    bos_id: int | None,
) -> None:
    model = model.to(_DTYPES[dtype]).eval()
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=pad_id
    )
    model.save_pretrained(path, safe_serialization=True)


def _build(model_cls: type, config: Qwen2Config | LlamaConfig, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        return model_cls(config)


def _qwen_tokenizer(pad: bool) -> Qwen2Tokenizer:
    vocab, merges = _vocab_and_merges(QWEN_SPECIALS)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>" if pad else None,
        additional_special_tokens=list(QWEN_SPECIALS),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if not pad:
        tokenizer.pad_token = None
    return tokenizer


def _save_qwen(
    path: str,
    tokenizer: Qwen2Tokenizer,
    *,
    dtype: str,
    hidden: int,
    layers: int,
    seed: int,
    eos_ids: list[int],
) -> str:
    _check_dtype(dtype)
    os.makedirs(path, exist_ok=True)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    _save_model(
        _build(Qwen2ForCausalLM, config, seed), path, dtype, eos_ids, tokenizer.pad_token_id, None
    )
    tokenizer.save_pretrained(path)
    _template_into_tokenizer_config(path)
    return path


def _template_into_tokenizer_config(path: str) -> None:
    # NOTE: Qwen2.5 repos keep the template in tokenizer_config.json; transformers 5 writes
    # chat_template.jinja. The Qwen stand-ins use the former, the Llama one the latter, so
    # both places a loader must look are exercised.
    jinja = os.path.join(path, "chat_template.jinja")
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(jinja, encoding="utf-8") as f:
        template = f.read()
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = template
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.remove(jinja)


def qwen_standin(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> str:
    """A tiny Qwen2 model directory at `path` (created if missing); returns `str(path)`."""
    tokenizer = _qwen_tokenizer(pad=True)
    eos_ids = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    return _save_qwen(
        str(path), tokenizer, dtype=dtype, hidden=hidden, layers=layers, seed=seed, eos_ids=eos_ids
    )


def nopad_standin(path: str | os.PathLike, *, dtype: str = "float32", seed: int = 0) -> str:
    """Like `qwen_standin` but with no pad token at all and one EOS (`<|im_end|>`)."""
    tokenizer = _qwen_tokenizer(pad=False)
    eos_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return _save_qwen(
        str(path), tokenizer, dtype=dtype, hidden=64, layers=2, seed=seed, eos_ids=eos_ids
    )


def llama_standin(path: str | os.PathLike, *, dtype: str = "float32", seed: int = 0) -> str:
    """A tiny Llama model directory whose tokenizer adds `<s>` once; returns `str(path)`."""
    path = str(path)
    _check_dtype(dtype)
    os.makedirs(path, exist_ok=True)
    backend = Tokenizer.from_str(_trained_bpe(LLAMA_SPECIALS))
    bos_id, eos_id, pad_id = (backend.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    eot_id = backend.token_to_id("<|eot_id|>")
    # Llama's add_bos_token behaviour: "<s> $A" for one sequence, "<s> $A <s> $B" for pairs.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(LLAMA_SPECIALS[3:]),
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=[eos_id, eot_id],
        pad_token_id=pad_id,
        dtype=dtype,
    )
    _save_model(
        _build(LlamaForCausalLM, config, seed), path, dtype, [eos_id, eot_id], pad_id, bos_id
    )
    tokenizer.save_pretrained(path)
    return path
