"""Incremental (streaming) detokenization with stop strings.

Decoding one token at a time is wrong for byte-level and SentencePiece
tokenizers: a token can end in the middle of a UTF-8 character, and some
tokenizers drop a token's leading space when it is decoded alone. So, as vLLM
and TGI do, each ``push`` decodes a short window of ids twice,
``ids[prefix_offset:read_offset]`` (text already emitted) and
``ids[prefix_offset:]``, and emits the difference only once it no longer ends in
U+FFFD (an incomplete character). Then both offsets move forward, which keeps
the window a few tokens long.

Stop strings are matched on the accumulated text. Text that could still become
the start of a stop string is held back, so a streaming client never sees any
part of a stop string; once a stop string appears, the text before it is
released, everything from it on is dropped, and ``stopped`` is set.
``flush()`` releases whatever was held back when generation ends for another
reason (EOS, length), including a trailing U+FFFD for bytes that can no longer
complete, so that after it ``text == tokenizer.decode(ids)`` (cut at a stop).
"""

from __future__ import annotations

import re
from typing import Sequence

from transformers import PreTrainedTokenizerBase

__all__ = ["IncrementalDetokenizer", "TokenPieces", "token_text"]

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context, so the first output token decodes as it
# would in the middle of the text (e.g. keeps a SentencePiece leading space).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas.

    ``text`` is all stable text decoded so far (cut before a matched stop
    string); it may run ahead of what ``push`` has returned by the held-back
    part of a possible stop string.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        skip_special_tokens: bool = True,
        stop_sequences: Sequence[str] = (),
        prompt_ids: Sequence[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_sequences: list[str] = [s for s in stop_sequences if s]
        self.stopped = False
        self.stop_reason: str | None = None
        self.token_ids: list[int] = []  # output ids pushed so far

        context = list(prompt_ids or [])[-_PROMPT_CONTEXT:]
        self._ids: list[int] = context  # decode window source: context + output
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""  # stable decoded text
        self._emitted = 0  # chars of _text already returned

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> str:
        """Add one token; return the text it makes visible (possibly "")."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        self._ids.append(token_id)
        return self._release(self._decode_stable(), final=False)

    def flush(self) -> str:
        """Return everything still held back; call once generation has ended."""
        if self.stopped:
            return ""
        tail = self._decode_delta()  # may end in U+FFFD: those bytes will never complete
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(tail, final=True)

    # --- decoding ------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: it looks across the window edge and would make
        # the two decodes disagree on the shared prefix.
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_delta(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""

    def _decode_stable(self) -> str:
        """New text if it ends on a complete character, else "" (wait for more bytes)."""
        delta = self._decode_delta()
        if not delta or delta.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    # --- stop strings ----------------------------------------------------------

    def _release(self, delta: str, final: bool) -> str:
        """Append ``delta``, check for stops, and return what may be emitted now."""
        self._text += delta
        hit = self._find_stop()
        if hit is not None:
            index, stop = hit
            self._text = self._text[:index]
            self.stopped, self.stop_reason = True, stop
            end = index
        else:
            end = len(self._text) if final else len(self._text) - self._held_back()
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        """Earliest stop string in the not-yet-emitted text (first listed wins a tie)."""
        # Held-back text guarantees a stop cannot start inside emitted text.
        best: tuple[int, str] | None = None
        for stop in self.stop_sequences:
            index = self._text.find(stop, self._emitted)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _held_back(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of a stop string."""
        pending = self._text[self._emitted :]
        longest = 0
        for stop in self.stop_sequences:
            for size in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """Text of one token on its own, special tokens included (for per-token details).

    A token holding only part of a UTF-8 character decodes to U+FFFD.
    """
    return tokenizer.decode(
        [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte → printable-character table, inverted (byte-level BPE vocabularies spell
    every byte with one of these characters)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _gpt2_byte_decoder()
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _vocab_kind(tokenizer: PreTrainedTokenizerBase) -> str:
    """"byte_level" (GPT-2/Qwen2 BPE), "sentencepiece" (▁ for spaces, <0xNN> byte fallback) or "other"."""
    if hasattr(tokenizer, "byte_decoder"):
        return "byte_level"
    if hasattr(tokenizer, "sp_model"):
        return "sentencepiece"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = type(getattr(backend, "decoder", None)).__name__
    if decoder == "ByteLevel":
        return "byte_level"
    if decoder == "Sequence" and "<0x0A>" in tokenizer.get_vocab():
        return "sentencepiece"
    return "other"


class TokenPieces:
    """Each token's own bytes and text, for per-token log-probability entries (cached by id).

    The bytes are exact for byte-level BPE and SentencePiece (byte-fallback) vocabularies, read
    from the token's vocabulary entry (`convert_ids_to_tokens`), so a token holding part of a
    UTF-8 character has its real bytes; for other vocabularies and for added (special) tokens,
    they are the UTF-8 of `token_text`. The text is the bytes decoded as UTF-8, an incomplete
    character as U+FFFD."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._kind: str | None = None
        self._added: set[str] = set()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """(text, bytes as a list of ints)"""
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def _bytes(self, token_id: int) -> bytes:
        if self._kind is None:
            self._kind = _vocab_kind(self.tokenizer)
            self._added = set(self.tokenizer.get_added_vocab())
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str) or piece in self._added or self._kind == "other":
            return token_text(self.tokenizer, token_id).encode()
        if self._kind == "byte_level":
            try:
                return bytes(_BYTE_DECODER[c] for c in piece)
            except KeyError:
                return token_text(self.tokenizer, token_id).encode()
        if m := _SP_BYTE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()
