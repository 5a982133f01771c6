"""Char tokenizer: id layout, `<bos>` added once by its own post-processor (Llama's
convention), exact round trips through save/load."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hpcalign.models.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    build_char_tokenizer,
    char_symbols,
)

SYMBOLS = "abcxyz019=+ :\n"


def test_special_ids_then_symbols_in_order():
    tok = build_char_tokenizer(SYMBOLS)
    assert len(tok) == 4 + len(SYMBOLS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    for i, char in enumerate(SYMBOLS):
        assert tok.encode(char, add_special_tokens=False) == [4 + i], repr(char)


def test_encode_is_bos_then_one_id_per_char_and_decode_concatenates():
    tok = build_char_tokenizer(SYMBOLS)
    text = "ab c=19+0:\n  zyx"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [4 + SYMBOLS.index(c) for c in text]
    assert tok(text)["input_ids"] == tok.encode(text) == [BOS_ID, *ids]  # BOS once, no EOS
    assert tok([text, text])["input_ids"] == [[BOS_ID, *ids]] * 2
    assert tok.decode(ids) == text
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID], skip_special_tokens=True) == text
    assert tok.decode([BOS_ID, *ids[:2], EOS_ID]) == "<bos>ab<eos>"


def test_unknown_character_is_unk():
    tok = build_char_tokenizer(SYMBOLS)
    assert tok.encode("aQb", add_special_tokens=False) == [4, UNK_ID, 5]


@pytest.mark.parametrize("bad", ["", "aba", "aé"])
def test_bad_symbol_sets_are_refused(bad):
    with pytest.raises(ValueError):
        build_char_tokenizer(bad)


def test_save_and_autotokenizer_reload_give_identical_ids(tmp_path):
    tok = build_char_tokenizer(SYMBOLS)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    text = "xyz= 19 a\nb"
    for loaded in (AutoTokenizer.from_pretrained(tmp_path),
                   PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert loaded.encode(text) == tok.encode(text) == [BOS_ID, *tok.encode(text, add_special_tokens=False)]
        assert loaded(text).input_ids == tok(text).input_ids
        assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == text
        assert loaded.get_vocab() == tok.get_vocab()
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_char_symbols_are_the_real_characters():
    assert char_symbols(build_char_tokenizer(SYMBOLS)) == "".join(sorted(SYMBOLS))
