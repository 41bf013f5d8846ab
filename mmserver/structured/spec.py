"""Constraint specs as clients send them, reduced to one canonical ``(kind, text)`` key.

Accepted forms (the HTTP layer passes the client's object through unchanged):

* OpenAI ``response_format``: ``{"type": "json_object"}`` and
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``.
  ``{"type": "text"}`` means *no* constraint: the HTTP layer leaves ``structured`` unset for it.
* vLLM ``structured_outputs`` (and the older ``guided_*`` fields, with or without the prefix),
  exactly one of: ``{"json": schema dict or JSON string}``, ``{"regex": str}``,
  ``{"choice": [str, ...]}``, ``{"grammar": EBNF str}``, ``{"json_object": true}``.

The canonical text keys the grammar caches, so equal constraints compile once. JSON schemas
are re-serialised compactly but *keep their key order*: the grammar emits object properties in
the schema's order, so two schemas that differ only in order are different grammars.

Nothing here imports xgrammar: the shape of a spec can be checked cheaply anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["StructuredOutputError", "GrammarSpec", "parse_spec", "KINDS"]

KINDS = ("json", "json_object", "regex", "choice", "grammar")
_VLLM_KEYS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputError(ValueError):
    """An invalid constraint (malformed spec, schema, regex or grammar): a client error (HTTP 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint, canonical: ``kind`` is one of ``KINDS``; ``text`` is the schema as compact
    JSON, the regex, the JSON list of choices, the EBNF source, or ``""`` for json_object."""

    kind: str
    text: str


def parse_spec(spec: Mapping[str, Any]) -> GrammarSpec:
    """Reduce a client's constraint object to its canonical ``GrammarSpec``.

    Raises ``StructuredOutputError`` naming what is wrong with the object's shape; whether the
    schema, regex or grammar itself is valid is decided when it is built (``build_grammar``)."""
    if not isinstance(spec, Mapping):
        raise StructuredOutputError(f"structured output spec must be an object, got {type(spec).__name__}")
    if "type" in spec:
        return _parse_response_format(spec)
    present = {_strip_guided(k): v for k, v in spec.items() if _strip_guided(k) in _VLLM_KEYS and v is not None}
    if len(present) != 1:
        raise StructuredOutputError(
            "structured output spec must have a 'type' (OpenAI response_format) or exactly one of "
            f"{', '.join(_VLLM_KEYS)}; got keys {sorted(spec)}")
    (kind, value), = present.items()
    if kind == "json":
        return GrammarSpec("json", _canonical_schema(value, "json schema"))
    if kind == "json_object":
        if value is not True:
            raise StructuredOutputError(f"json_object must be true, got {value!r}")
        return GrammarSpec("json_object", "")
    if kind == "choice":
        return GrammarSpec("choice", _canonical_choices(value))
    if not isinstance(value, str) or not value:
        raise StructuredOutputError(f"{kind} must be a non-empty string, got {_short(value)}")
    return GrammarSpec(kind, value)


def _parse_response_format(spec: Mapping[str, Any]) -> GrammarSpec:
    kind = spec["type"]
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    if kind == "json_schema":
        body = spec.get("json_schema")
        if not isinstance(body, Mapping):
            raise StructuredOutputError("response_format.json_schema must be an object with a 'schema'")
        if "schema" not in body:
            raise StructuredOutputError("response_format.json_schema.schema is required")
        return GrammarSpec("json", _canonical_schema(body["schema"], "response_format.json_schema.schema"))
    raise StructuredOutputError(
        f"response_format.type must be 'json_object' or 'json_schema' to constrain output, got {kind!r}")


def _strip_guided(key: str) -> str:
    return key[len("guided_"):] if isinstance(key, str) and key.startswith("guided_") else key


def _canonical_schema(schema: Any, where: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(schema, (Mapping, bool)):
        raise StructuredOutputError(f"{where} must be a JSON schema object, got {_short(schema)}")
    try:
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StructuredOutputError(f"{where} cannot be serialised as JSON: {e}") from None


def _canonical_choices(choices: Any) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise StructuredOutputError(f"choice must be a non-empty list of strings, got {_short(choices)}")
    return json.dumps(choices, ensure_ascii=False)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
