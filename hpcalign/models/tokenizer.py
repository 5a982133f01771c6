"""Character-level tokenizer for the tiny models: one token per character.

Ids: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then the symbols in the given order.
Its convention is Llama's: encoding with special tokens (`tokenizer(text)`, the default)
puts `<bos>` in front once, through a TemplateProcessing post-processor saved in
tokenizer.json, and `add_special_tokens=False` gives the bare characters. So hpcalign,
TRL and vLLM, which all take a standard prompt as `tokenizer(prompt)`, feed the model the
same `[<bos>, ...]` ids without anyone knowing the tokenizer.

How it is built, and why not a plain WordLevel model: `AutoTokenizer.from_pretrained` on a
directory whose config.json says `model_type: qwen2` ignores the saved pipeline and rebuilds
the tokenizer as `Qwen2Tokenizer` (transformers 5 lists qwen2 in
`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`): a byte-level BPE over the saved vocabulary.
A WordLevel char tokenizer loaded that way silently drops spaces. So this tokenizer IS that
pipeline with no merges: a byte-level pre-tokenizer and decoder over single-byte symbols,
whose BPE without merges is exactly a WordLevel over single characters. Every loader
(`PreTrainedTokenizerFast`, `AutoTokenizer` on a Qwen2 or Llama dir, vLLM) then gives the
same ids (both honour the saved post-processor). Symbols must therefore be single-byte
(ASCII) characters. One difference remains: the Qwen2Tokenizer rebuild has no `<unk>`, so
a character outside the symbols vanishes there and becomes `<unk>` in the saved pipeline;
prompts are checked against the symbols before they reach a model (`data.tasks`).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def build_char_tokenizer(symbols: str) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is the 4 special tokens followed by `symbols`.

    Raises ValueError on an empty, repeated or non-ASCII symbol set.
    """
    if not symbols:
        raise ValueError("symbols must not be empty")
    if len(set(symbols)) != len(symbols):
        dups = sorted({c for c in symbols if symbols.count(c) > 1})
        raise ValueError(f"symbols repeat characters: {dups!r}")
    non_ascii = sorted({c for c in symbols if ord(c) > 127})
    if non_ascii:
        raise ValueError(f"symbols must be ASCII characters (one byte each), got {non_ascii!r}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for char in symbols:
        # the byte-level stand-in of the character (' ' -> 'Ġ', '\n' -> 'Ċ', 'a' -> 'a')
        vocab[byte_level.pre_tokenize_str(char)[0][0]] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    # NOTE: "<bos> $A" like Llama's add_bos_token; a pair gets one <bos> per sequence.
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    return tokenizer


def char_symbols(tokenizer: PreTrainedTokenizerFast) -> str:
    """The characters `tokenizer` can spell, as text (for `data.tasks.make_task(symbols=...)`).

    Decodes every non-special id, so byte-level stand-ins come back as the real characters
    (' ' rather than 'Ġ').
    """
    special = set(tokenizer.all_special_ids)
    pieces = (tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special)
    return "".join(sorted({char for piece in pieces for char in piece}))
