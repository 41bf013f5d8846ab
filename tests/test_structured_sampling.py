"""Grammar-constrained sampling through the Sampler, with the tiny checkpoint's real tokenizer.

The logits are random (seeded), as a random-weight model's would be: whatever the model
"wants", the grammar alone must make the output valid."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mmserver.engine.sampling import Sampler, SamplingParams, make_generator
from mmserver.models.tokenizer import load_tokenizer
from mmserver.structured import StructuredCompiler, StructuredOutputError

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


def _generate(compiler, tokenizer, spec, seed, *, sample=False, cap=64, min_new_tokens=1, bias=None):
    """Decode under `spec` from random logits (+ `bias`) until the grammar terminates (or `cap`
    tokens). Returns (text, terminated). The ids past the tokenizer get the highest logits of
    all: only the grammar mask keeps them out."""
    state = compiler.new_state(spec)
    params = SamplingParams(do_sample=sample, seed=seed, structured=spec, stop_token_ids=EOS_IDS,
                            max_new_tokens=cap, min_new_tokens=min_new_tokens)
    params.validate()
    logits_rng = torch.Generator().manual_seed(seed)
    generator = make_generator(seed, "cpu")
    sampler = Sampler()
    out: list[int] = []
    for _ in range(cap):
        logits = torch.randn(1, compiler.vocab_size, generator=logits_rng) * 3
        logits[:, len(tokenizer):] += 100.0
        if bias is not None:
            logits[0, : bias.numel()] += bias
        token = sampler(logits, [params], [[]], [out], [generator], grammars=[state])[0].item()
        assert token < len(tokenizer)
        assert state.accept(token), f"sampled token {token} was not allowed by the grammar"
        if state.is_terminated():
            assert token in EOS_IDS
            return tokenizer.decode(out), True
        out.append(token)
    return tokenizer.decode(out), False


# --- decoding under a grammar ---------------------------------------------------------------


SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": -5, "maximum": 999}},
    "required": ["color", "count"],
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_parses_and_validates(compiler, tokenizer, seed):
    spec = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    text, done = _generate(compiler, tokenizer, spec, seed, sample=seed == 2)
    assert done, text
    value = json.loads(text)
    assert set(value) == {"color", "count"}
    assert value["color"] in ("red", "green", "blue")
    assert isinstance(value["count"], int) and not isinstance(value["count"], bool)
    assert -5 <= value["count"] <= 999


def test_vllm_json_kind_takes_a_schema_string(compiler, tokenizer):
    text, done = _generate(compiler, tokenizer, {"json": json.dumps(SCHEMA)}, 3)
    assert done and json.loads(text)["color"] in ("red", "green", "blue")


def test_json_object_output_is_an_object(compiler, tokenizer):
    # Uniformly random tokens close a free JSON string only by chance (a quote among ~150k
    # tokens), so this "model" has learnt a little JSON: tokens with quotes or closing brackets
    # get +8 on top of the noise. Which of them fit where is still up to the grammar.
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    bias = torch.tensor([8.0 if any(c in (p or "") for c in '"}]') else 0.0 for p in pieces])
    texts = []
    for seed in range(4):
        text, done = _generate(compiler, tokenizer, {"type": "json_object"}, seed, cap=64, bias=bias)
        assert done, text
        assert isinstance(json.loads(text), dict), text
        texts.append(text)
    assert any(len(json.loads(t)) > 0 for t in texts), texts  # not only "{}"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_regex_output_matches(compiler, tokenizer, seed):
    text, done = _generate(compiler, tokenizer, {"regex": r"[a-c]{3}-\d{2}"}, seed, sample=seed % 2 == 1)
    assert done and re.fullmatch(r"[a-c]{3}-\d{2}", text), text


def test_choice_output_is_one_of_the_choices(compiler, tokenizer):
    choices = ["yes", "no", "maybe not", 'a "quoted" one']
    seen = set()
    for seed in range(6):
        text, done = _generate(compiler, tokenizer, {"guided_choice": choices}, seed)
        assert done and text in choices, text
        seen.add(text)
    assert len(seen) > 1


def test_ebnf_grammar_output_matches(compiler, tokenizer):
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]*'
    for seed in range(3):
        text, done = _generate(compiler, tokenizer, {"grammar": grammar}, seed)
        assert done and re.fullmatch(r"\((?:[1-9][0-9]*)(?:\+[1-9][0-9]*)*\)", text), text


def test_grammar_wins_over_min_new_tokens(compiler, tokenizer):
    # "x" is the whole output, then only EOS fits; min_new_tokens=5 would forbid it.
    text, done = _generate(compiler, tokenizer, {"choice": ["x"]}, 0, min_new_tokens=5)
    assert done and text == "x"


def test_min_new_tokens_still_masks_stop_where_the_grammar_allows_more(compiler, tokenizer, vocab):
    state = compiler.new_state({"regex": r"a+"})
    a = tokenizer.convert_tokens_to_ids("a")
    assert state.accept(a)
    logits = torch.full((1, vocab), -10.0)
    logits[0, EOS_IDS[0]] = 10.0
    params = SamplingParams(min_new_tokens=3, stop_token_ids=EOS_IDS, structured={"regex": r"a+"})
    token = Sampler()(logits, [params], [[]], [[a]], [None], grammars=[state])[0].item()
    assert token not in EOS_IDS and state.accept(token)


# --- batches ---------------------------------------------------------------------------------


def test_free_row_is_unaffected_by_a_grammar_row(compiler, vocab):
    free = SamplingParams(do_sample=True, seed=5)
    constrained = SamplingParams(do_sample=True, seed=6, structured={"regex": r"[0-9]+"})

    def run(with_grammar_row: bool) -> list[int]:
        rng = torch.Generator().manual_seed(0)
        gens = [make_generator(5, "cpu"), make_generator(6, "cpu")]
        state = compiler.new_state({"regex": r"[0-9]+"})
        sampler, free_out = Sampler(), []
        for _ in range(8):
            logits = torch.randn(2, vocab, generator=rng) * 3
            if with_grammar_row:
                tokens, logprobs = sampler(logits, [free, constrained], [[], []], [[], []], gens,
                                           grammars=[None, state])
                assert state.accept(tokens[1].item())
            else:
                tokens, logprobs = sampler(logits[:1], [free], [[]], [[]], gens[:1])
            free_out.append(tokens[0].item())
            # Raw logprobs stay raw on every row, masked or not.
            assert torch.equal(logprobs, torch.log_softmax(logits[: len(tokens)], -1)
                               .gather(1, tokens[:, None]).squeeze(1))
        return free_out

    assert run(True) == run(False)


def test_rows_without_grammar_take_the_fast_path(compiler, vocab, monkeypatch):
    import mmserver.structured.mask as mask

    def boom(*args, **kwargs):
        raise AssertionError("bitmask applied to a batch without grammars")

    monkeypatch.setattr(mask.xgr, "apply_token_bitmask_inplace", boom)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    tokens, _ = Sampler()(logits, [SamplingParams()] * 3, [[]] * 3, [[]] * 3, [None] * 3, grammars=[None] * 3)
    assert torch.equal(tokens, logits.argmax(-1))


def test_validate_compiles_the_spec():
    SamplingParams(structured={"regex": "[a-c]+"}).validate()
    with pytest.raises(StructuredOutputError, match=r"invalid regex"):
        SamplingParams(structured={"regex": "[a-"}).validate()
    with pytest.raises(ValueError, match=r"invalid JSON schema"):
        SamplingParams(structured={"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}).validate()


def test_needs_host_tokens():
    assert not SamplingParams().needs_host_tokens
    assert SamplingParams(presence_penalty=0.5).needs_host_tokens
    assert SamplingParams(structured={"regex": "a+"}).needs_host_tokens
    assert not SamplingParams(top_logprobs=5).needs_host_tokens
