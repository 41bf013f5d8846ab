"""Compiling grammars for one tokenizer, and the per-tokenizer vocabulary info xgrammar needs.

``TokenizerInfo`` (a scan of the whole vocabulary, ~1 s for a 150k-token vocab) is built once per
(tokenizer, model vocab size, stop ids) and shared. Compiled grammars (token-mask caches for that
vocabulary) live in a bounded LRU per ``StructuredCompiler``, keyed by the canonical spec.

Vocabulary: ``vocab_size`` is the model's (the LM head's rows), which may exceed
``len(tokenizer)``; xgrammar treats the extra ids as special tokens, so grammar masks never allow
them. Stop ids (the model's EOS ids) are allowed exactly when the grammar can end, and accepting
one terminates the matcher.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import xgrammar as xgr

from .grammar import build_grammar
from .spec import GrammarSpec, parse_spec
from .state import GrammarState

__all__ = ["StructuredCompiler", "tokenizer_info", "COMPILED_CACHE_SIZE"]

COMPILED_CACHE_SIZE = 128

_infos: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_infos_lock = threading.Lock()


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of ``tokenizer`` for a model with ``vocab_size`` logits; built once and
    kept while the tokenizer lives."""
    key = (int(vocab_size), tuple(stop_token_ids))
    with _infos_lock:
        per_tokenizer = _infos.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=key[0], stop_token_ids=list(key[1]) or None)
        return per_tokenizer[key]


class StructuredCompiler:
    """Turns constraint specs into fresh ``GrammarState``s for one tokenizer / model vocabulary.

    One per engine (model). Thread-safe: the HTTP layer may validate while the engine compiles."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 cache_size: int = COMPILED_CACHE_SIZE, max_threads: int = 2):
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.vocab_size = int(vocab_size)
        # Our LRU is the cache (bounded); xgrammar's own would grow without limit by default.
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: Mapping[str, Any] | GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar for a client spec (or a parsed one); raises
        ``StructuredOutputError`` if it is invalid."""
        key = spec if isinstance(spec, GrammarSpec) else parse_spec(spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compiler.compile_grammar(build_grammar(key))  # outside the lock: can take ms
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def new_state(self, spec: Mapping[str, Any] | GrammarSpec) -> GrammarState:
        """A fresh matcher for one request (one per request: it holds that request's progress)."""
        return GrammarState(self.compile(spec))

    def cache_len(self) -> int:
        return len(self._cache)
