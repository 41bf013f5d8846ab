"""mmserver.structured on its own: specs, validation errors, caches, and what a GrammarState
allows, with the tiny checkpoint's real tokenizer."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mmserver.models.tokenizer import load_tokenizer
from mmserver.structured import (GrammarSpec, StructuredCompiler, StructuredOutputError, TokenBitmask,
                                 build_grammar, parse_spec, tokenizer_info)

EOS_IDS = [151645, 151643]  # the tiny Qwen2 checkpoint's generation_config eos ids
EXTRA = 64  # LM-head rows beyond the tokenizer, as padded vocabularies have


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return len(tokenizer) + EXTRA


@pytest.fixture(scope="module")
def compiler(tokenizer, vocab):
    return StructuredCompiler(tokenizer, vocab, EOS_IDS)


def _allowed(state, vocab: int) -> set[int]:
    logits = torch.zeros(1, vocab)
    TokenBitmask().apply(logits, [state])
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


# --- states and masks -----------------------------------------------------------------------


def test_stop_tokens_allowed_exactly_when_the_grammar_can_end(compiler, tokenizer, vocab):
    state = compiler.new_state({"regex": r"ab?"})
    assert not _allowed(state, vocab) & set(EOS_IDS)
    assert state.accept(tokenizer.convert_tokens_to_ids("a"))
    allowed = _allowed(state, vocab)
    assert set(EOS_IDS) <= allowed and tokenizer.convert_tokens_to_ids("b") in allowed
    assert state.accept(tokenizer.convert_tokens_to_ids("b"))
    assert _allowed(state, vocab) == set(EOS_IDS)
    assert not state.accept(tokenizer.convert_tokens_to_ids("a"))  # rejected, state unchanged
    assert state.accept(EOS_IDS[0]) and state.is_terminated()
    # Terminated: only stop tokens, and they stay accepted (a request that goes on is harmless).
    assert _allowed(state, vocab) == set(EOS_IDS)
    assert state.accept(EOS_IDS[1]) and not state.accept(tokenizer.convert_tokens_to_ids("a"))


def test_padded_vocab_ids_are_never_allowed(compiler, tokenizer, vocab):
    state = compiler.new_state({"json_object": True})
    allowed = _allowed(state, vocab)
    assert allowed and max(allowed) < len(tokenizer)
    assert state.accept(tokenizer.convert_tokens_to_ids("{"))
    assert not _allowed(state, vocab) & set(range(len(tokenizer), vocab))
    assert not state.accept(len(tokenizer) + 1)


def test_only_rows_with_a_state_are_masked(compiler, vocab):
    # Rows without a state are not touched, rows with one are.
    logits = torch.zeros(2, vocab)
    TokenBitmask().apply(logits, [None, compiler.new_state({"regex": "[0-9]"})])
    assert torch.isfinite(logits[0]).all()
    assert 0 < torch.isfinite(logits[1]).sum() < 50


# --- specs, errors, caches ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"json": {"type": "nonsense"}}, r"invalid JSON schema: .*nonsense"),
        ({"json": {"type": "object", "properties": {"a": {"$ref": "#/defs/x"}}}}, r"invalid JSON schema: .*defs"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{oops"}}, r"schema is not valid JSON"),
        ({"regex": "[a-"}, r"invalid regex: .*Unclosed '\['"),
        ({"grammar": "root ::= missing"}, r"invalid EBNF grammar: .*\"missing\" is not defined"),
        ({"type": "text"}, r"response_format.type"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, r"json_schema.schema is required"),
        ({"regex": "a", "choice": ["b"]}, r"exactly one of"),
        ({"choice": []}, r"choice must be a non-empty list of strings"),
        ({"choice": ["a", 1]}, r"choice must be a non-empty list of strings"),
        ({"regex": ""}, r"regex must be a non-empty string"),
        ("regex", r"must be an object"),
    ],
)
def test_invalid_specs_raise_a_value_error(spec, message):
    with pytest.raises(StructuredOutputError, match=message):
        build_grammar(parse_spec(spec))
    assert issubclass(StructuredOutputError, ValueError)


def test_error_messages_drop_xgrammar_source_locations():
    with pytest.raises(StructuredOutputError) as info:
        build_grammar(parse_spec({"regex": "(ab"}))
    assert ".cc:" not in str(info.value) and not re.search(r"\[\d\d:\d\d:\d\d\]", str(info.value))


def test_specs_are_canonical():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    openai = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    assert parse_spec(openai) == parse_spec({"json": schema}) == parse_spec({"guided_json": json.dumps(schema, indent=2)})
    assert parse_spec({"type": "json_object"}) == parse_spec({"json_object": True}) == GrammarSpec("json_object", "")
    assert parse_spec({"choice": ["a", "b"]}) != parse_spec({"choice": ["b", "a"]})
    # Property order is kept: it is the order the grammar emits.
    reordered = {"properties": {"a": {"type": "integer"}}, "type": "object"}
    assert parse_spec({"json": reordered}) != parse_spec({"json": schema})


def test_compiled_grammars_are_cached_and_bounded(tokenizer, vocab):
    compiler = StructuredCompiler(tokenizer, vocab, EOS_IDS, cache_size=2)
    first = compiler.compile({"regex": "a+"})
    assert compiler.compile({"guided_regex": "a+"}) is first
    compiler.compile({"regex": "b+"})
    compiler.compile({"regex": "a+"})  # refreshes a+: b+ is now the oldest
    compiler.compile({"regex": "c+"})
    assert compiler.cache_len() == 2
    assert compiler.compile({"regex": "a+"}) is first


def test_tokenizer_info_is_built_once_per_tokenizer(compiler, tokenizer, vocab):
    assert tokenizer_info(tokenizer, vocab, EOS_IDS) is compiler.info
    assert StructuredCompiler(tokenizer, vocab, EOS_IDS).info is compiler.info
    assert tokenizer_info(tokenizer, vocab, EOS_IDS[:1]) is not compiler.info
    assert compiler.info.vocab_size == vocab
