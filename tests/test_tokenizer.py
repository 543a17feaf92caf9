"""Tokenizers: exact round trips (BPE on any Unicode), clear errors, stable files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.errors import UserError
from llmlab.tokenizer import BPETokenizer, CharTokenizer, decode_stream, tokenizer_from_json

NOTES = Path(__file__).resolve().parents[1].parent / "shared" / "seed" / "000_04061712839217fa.txt"
TEXT = "def f(x):\n    return x * 2  # 二 拒绝采样\n\n" * 50 + "class A:\n    pass\n" * 20


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXT, vocab_size=300)


def test_char_tokenizer_vocabulary_is_the_sorted_characters_of_the_corpus():
    tok = CharTokenizer.train("hello world")
    assert tok.chars == " dehlorw"
    assert tok.decode(tok.encode("world hello")) == "world hello"
    assert tok.encode("eh") == [2, 3]


def test_char_tokenizer_refuses_an_unseen_character():
    with pytest.raises(UserError, match=r"character 'z' \(U\+007A\) is not in"):
        CharTokenizer.train("abc").encode("abz")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_bpe_round_trips_any_unicode_string(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_round_trips_the_chinese_notes(bpe):
    text = NOTES.read_text(encoding="utf-8") if NOTES.exists() else TEXT
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_vocabulary_size_is_respected_and_merges_are_learned(bpe):
    assert 256 < bpe.vocab_size <= 300
    assert len(bpe.encode("def f(x):\n    return x * 2")) < len("def f(x):\n    return x * 2") / 2


def test_chunked_encoding_equals_whole_text_encoding(bpe):
    text = (TEXT + "\n\n   \n" + "x = [1,\n  2]\n") * 40
    assert bpe.encode_array(text).tolist() == bpe.encode(text)


@pytest.mark.parametrize("make", [lambda: CharTokenizer.train(TEXT), lambda: BPETokenizer.train(TEXT, 300)])
def test_tokenizer_json_round_trip_gives_identical_ids(make):
    tok = make()
    again = tokenizer_from_json(tok.to_json())
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert again.vocab_size == tok.vocab_size


def test_stream_decoding_holds_back_half_characters(bpe):
    ids = bpe.encode("龍!")  # unseen in training: one token per UTF-8 byte, 3 for 龍
    assert len(ids) == 4
    out, emitted, pieces = "", 0, []
    for n in range(1, len(ids) + 1):
        piece, emitted = decode_stream(bpe, ids[:n], emitted)
        pieces.append(piece)
        out += piece
    assert pieces == ["", "", "龍", "!"]
    assert out == "龍!"
