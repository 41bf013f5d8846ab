"""A canonical ``GrammarSpec`` as an xgrammar ``Grammar`` (independent of any tokenizer).

Building the grammar is where an invalid schema, regex or EBNF is found, so request validation
calls ``build_grammar`` without needing the model's tokenizer; the result is cached (bounded
LRU) so the later compile for the tokenizer reuses it.

Choices made here, for output that parses and ends:

* JSON (schema and json_object) is compact: no free whitespace between tokens
  (``any_whitespace=False``). Free whitespace lets a weak or unlucky model emit whitespace
  forever without ever closing the object (a known failure with xgrammar's default).
* Schemas are strict (xgrammar ``strict_mode``): objects get no properties beyond those the
  schema lists unless it allows them itself. OpenAI's ``strict`` flag does not change this.
* json_object is "any JSON object" (``{"type": "object"}`` with extra properties allowed).
* choice is an EBNF alternation of the literal strings (JSON string escapes are valid EBNF).
"""

from __future__ import annotations

import functools
import json
import re

import xgrammar as xgr

from .spec import GrammarSpec, StructuredOutputError

__all__ = ["build_grammar", "GRAMMAR_CACHE_SIZE"]

GRAMMAR_CACHE_SIZE = 256

_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
         "choice": "choice list", "grammar": "EBNF grammar"}
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed check.
_NOISE = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*|Check failed: \(.*?\) is false:\s*")


def build_grammar(spec: GrammarSpec) -> xgr.Grammar:
    """The grammar for ``spec``; raises ``StructuredOutputError`` naming what is invalid."""
    return _build_cached(spec.kind, spec.text)


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _build_cached(kind: str, text: str) -> xgr.Grammar:
    # lru_cache does not keep exceptions, so an invalid spec is rebuilt (and rejected) each time.
    try:
        return _build(kind, text)
    except StructuredOutputError:
        raise
    except Exception as e:  # xgrammar reports every parse/convert failure as RuntimeError
        raise StructuredOutputError(f"invalid {_WHAT.get(kind, kind)}: {_clean(e)}") from None


def _build(kind: str, text: str) -> xgr.Grammar:
    if kind == "json":
        return xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type":"object"}', any_whitespace=False, strict_mode=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(text)
    if kind == "choice":
        choices = json.loads(text)
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(text)
    raise StructuredOutputError(f"unknown structured output kind {kind!r}; expected one of {', '.join(_WHAT)}")


def _clean(error: Exception) -> str:
    lines = [_NOISE.sub("", line).strip() for line in str(error).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(error).__name__
