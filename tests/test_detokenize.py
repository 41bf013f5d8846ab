"""Tests for mmserver.frontend.detokenize with a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmserver.frontend.detokenize import IncrementalDetokenizer, token_text

IM_END = "<|im_end|>"
MULTIBYTE = "héllo 世界 🙂"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


B2U = _bytes_to_unicode()


def _build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {B2U[b]: b for b in range(256)}  # byte b has id b
    merges = [
        (B2U[0xA9], "l"),  # "©l": last byte of "é" + "l" -> a token across a char boundary
        (B2U[0xB8], B2U[0x96]),  # last two bytes of "世"
        ("l", "o"),
        ("h", "e"),
        ("he", "l"),
    ]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([IM_END])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _build_tokenizer()


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids]


def _byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.mark.parametrize("text", ["Hello, world! hello there.", "a  b\n\tc", ""])
def test_ascii_stream_matches_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = _stream(detok, ids)
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert detok.text == text
    assert not detok.stopped


def test_multibyte_split_at_every_byte(tokenizer):
    ids = _byte_ids(MULTIBYTE)  # one token per byte
    detok = IncrementalDetokenizer(tokenizer)
    pieces = _stream(detok, ids)
    assert "".join(pieces) == MULTIBYTE == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    # A character appears exactly when its last byte arrives.
    assert sum(1 for p in pieces if p) == len(MULTIBYTE)
    assert detok.flush() == ""


def test_multibyte_with_merges_across_char_boundaries(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert B2U[0xA9] + "l" in tokens  # the test really exercises a cross-boundary token
    detok = IncrementalDetokenizer(tokenizer)
    pieces = _stream(detok, ids)
    assert "".join(pieces) == MULTIBYTE == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_every_split_of_a_multibyte_string(tokenizer):
    # Any grouping of the bytes into (byte) tokens streams to the same text.
    data = _byte_ids("é世🙂x")
    for cut in range(1, len(data)):
        ids = data[:cut] + data[cut:]
        detok = IncrementalDetokenizer(tokenizer)
        pieces = _stream(detok, ids)
        assert "".join(pieces) == "é世🙂x"
        assert all("\ufffd" not in p for p in pieces)


def test_incomplete_tail_is_released_only_by_flush(tokenizer):
    ids = _byte_ids("ab世")[:-1]  # cut inside the CJK character
    detok = IncrementalDetokenizer(tokenizer)
    pieces = _stream(detok, ids)
    assert "".join(pieces) == "ab"
    assert all("\ufffd" not in p for p in pieces)
    # At the end the bytes can never complete: flush gives what decode() gives.
    tail = detok.flush()
    assert "ab" + tail == tokenizer.decode(ids)
    assert detok.text == tokenizer.decode(ids)


def test_special_tokens_skipped(tokenizer):
    ids = tokenizer.encode(f"hi{IM_END}there{IM_END}", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids(IM_END) in ids
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(_stream(detok, ids)) + detok.flush() == "hithere"

    keep = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(_stream(keep, ids)) + keep.flush() == f"hi{IM_END}there{IM_END}"


def test_stop_string_removed_and_nothing_after(tokenizer):
    text = "hello world STOP more text"
    detok = IncrementalDetokenizer(tokenizer, stop_sequences=["STOP"])
    pieces = []
    for i in _byte_ids(text):
        pieces.append(detok.push(i))
        # At no point has any part of the stop string been emitted.
        assert "hello world ".startswith("".join(pieces))
    assert "".join(pieces) == "hello world "
    assert detok.stopped and detok.stop_reason == "STOP"
    assert detok.text == "hello world "
    assert detok.push(ord("x")) == "" and detok.flush() == ""


def test_stop_string_inside_one_token(tokenizer):
    ids = tokenizer.encode("hello", add_special_tokens=False)  # "hel" + "lo"
    detok = IncrementalDetokenizer(tokenizer, stop_sequences=["ll"])
    assert "".join(_stream(detok, ids)) == "he"
    assert detok.stopped and detok.stop_reason == "ll"


def test_earliest_stop_wins(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop_sequences=["cd", "bcde"])
    out = "".join(_stream(detok, _byte_ids("abcdef")))
    # "bcde" starts first but is not complete when "cd" completes.
    assert out == "ab" and detok.stop_reason == "cd"

    detok = IncrementalDetokenizer(tokenizer, stop_sequences=["cd", "bc"])
    assert "".join(_stream(detok, _byte_ids("abcdef"))) == "a"
    assert detok.stop_reason == "bc"


def test_partial_stop_held_then_released_by_continuation(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop_sequences=["###"])
    assert _stream(detok, _byte_ids("a##")) == ["a", "", ""]
    assert detok.text == "a##"  # held back, not emitted yet
    assert detok.push(ord("b")) == "##b"
    assert not detok.stopped
    assert detok.flush() == ""


def test_partial_stop_released_by_flush(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop_sequences=["</end>"])
    pieces = _stream(detok, _byte_ids("done</en"))
    assert "".join(pieces) == "done"
    assert detok.flush() == "</en"
    assert not detok.stopped


def test_overlapping_partial_stop(tokenizer):
    # "aab": after "aa", both "a" and "aa" could start the stop; hold the longest.
    detok = IncrementalDetokenizer(tokenizer, stop_sequences=["aab"])
    out = "".join(_stream(detok, _byte_ids("aaaab")))
    assert out == "aa" and detok.stopped


def test_multibyte_stop_string(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop_sequences=["界"])
    pieces = _stream(detok, _byte_ids(MULTIBYTE))
    assert "".join(pieces) == "héllo 世"
    assert all("\ufffd" not in p for p in pieces)


def test_prompt_context_does_not_change_output(tokenizer):
    prompt = tokenizer.encode("prompt 世", add_special_tokens=False)
    ids = tokenizer.encode(" héllo", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    assert "".join(_stream(detok, ids)) + detok.flush() == " héllo"
    assert detok.token_ids == ids


def test_token_text(tokenizer):
    ids = tokenizer.encode("hello", add_special_tokens=False)
    assert [token_text(tokenizer, i) for i in ids] == ["hel", "lo"]
    assert token_text(tokenizer, tokenizer.convert_tokens_to_ids(IM_END)) == IM_END
    assert token_text(tokenizer, ord(" ")) == " "
