"""The engine's structured outputs and top_logprobs, without a server: grammars accept each token
and end their request with "stop"; alternatives flow through the overlap schedule on and off
alike; requests without either are untouched by a batch neighbour that has them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mmserver.engine.engine import Engine, EngineConfig
from mmserver.engine.sampling import SamplingParams
from test_cuda_graphs import _requests


def _engine(pipe, overlap: bool, tokenizer=True) -> Engine:
    config = EngineConfig(max_total_tokens=8192, max_requests=16, max_req_len=1024, overlap_schedule=overlap)
    return Engine(pipe.model.llm, config, tokenizer=(lambda: pipe.tokenizer) if tokenizer else None)


def _params(pipe, **kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 8, "stop_token_ids": list(pipe.stop_token_ids), **kw})


def _run(eng: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[dict]:
    """Per request: tokens, logprobs, tops and finish reason, all requests joining at once."""
    rids = {eng.add_request(ids, p): i for i, (ids, p) in enumerate(requests)}
    out = [{"tokens": [], "logprobs": [], "top": [], "reason": None} for _ in requests]
    steps = 0
    while eng.has_work():
        for o in eng.step():
            r = out[rids[o.req_id]]
            assert r["reason"] is None, "a token after the finish"
            r["tokens"].append(o.token_id)
            r["logprobs"].append(o.logprob)
            r["top"].append(o.top)
            if o.finished:
                r["reason"] = o.finish_reason
        steps += 1
        assert steps < 300
    assert eng.kv.used == 0 and eng.table.free_rows == eng.config.max_requests
    return out


@pytest.fixture(scope="module")
def prompts(pipe):
    return [r["prompt_ids"] for r in _requests(pipe, 4, seed=31, images=False)]


SPECS = [{"choice": ["yes", "no", "maybe"]}, {"regex": "[a-c]{2,4}x"},
         {"json": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                   "required": ["n"]}}]


@pytest.mark.parametrize("overlap", [False, True])
def test_grammars_accept_and_stop(pipe, prompts, overlap):
    reqs = [(prompts[i], _params(pipe, structured=spec, max_new_tokens=40, ignore_eos=i == 0))
            for i, spec in enumerate(SPECS)]
    got = _run(_engine(pipe, overlap), reqs)
    stop = set(pipe.stop_token_ids)
    texts = []
    for r in got:
        assert r["reason"] == "stop" and r["tokens"][-1] in stop  # ends on the stop token the grammar took
        texts.append(pipe.tokenizer.decode(r["tokens"][:-1]))
    assert texts[0] in ("yes", "no", "maybe")  # with ignore_eos too: a terminated grammar ends the request
    assert re.fullmatch("[a-c]{2,4}x", texts[1])
    assert 0 <= json.loads(texts[2])["n"] <= 9


def test_grammar_with_overlap_equals_without(pipe, prompts):
    reqs = lambda: [(prompts[0], _params(pipe, structured=SPECS[1], max_new_tokens=20)),  # noqa: E731
                    (prompts[1], _params(pipe, max_new_tokens=12, ignore_eos=True)),
                    (prompts[2], _params(pipe, structured=SPECS[2], max_new_tokens=30, top_logprobs=2))]
    off, on = _run(_engine(pipe, False), reqs()), _run(_engine(pipe, True), reqs())
    assert [r["tokens"] for r in on] == [r["tokens"] for r in off]
    assert [r["reason"] for r in on] == [r["reason"] for r in off]


def test_plain_request_unchanged_beside_a_grammar(pipe, prompts):
    plain = (prompts[3], _params(pipe, max_new_tokens=10, ignore_eos=True))
    alone = _run(_engine(pipe, True), [plain])[0]
    mixed = _run(_engine(pipe, True), [(prompts[0], _params(pipe, structured=SPECS[2], max_new_tokens=30)), plain,
                                       (prompts[1], _params(pipe, structured=SPECS[0], max_new_tokens=30))])[1]
    assert mixed["tokens"] == alone["tokens"] and mixed["top"] == [None] * 10
    np.testing.assert_allclose(mixed["logprobs"], alone["logprobs"], rtol=1e-5, atol=1e-5)


class _Refuser:
    """A grammar state that allows everything and then refuses the token."""

    def fill_mask(self, bitmask, row):
        return False

    def accept(self, token):
        return False

    def is_terminated(self):
        return False


def test_refused_token_ends_with_error(pipe, prompts):
    eng = _engine(pipe, False)
    rid = eng.add_request(prompts[0], _params(pipe, max_new_tokens=5, ignore_eos=True, structured=SPECS[0]))
    eng.requests[rid].grammar = _Refuser()
    outs = []
    while eng.has_work():
        outs += eng.step()
    assert [(o.finished, o.finish_reason) for o in outs] == [(True, "error")]
    assert eng.kv.used == 0


def test_bad_spec_and_no_tokenizer_are_request_errors(pipe, prompts):
    from mmserver.engine.engine import RequestError

    with pytest.raises(ValueError, match="invalid regex"):
        _engine(pipe, False).add_request(prompts[0], _params(pipe, structured={"regex": "(unclosed"}))
    with pytest.raises(RequestError, match="tokenizer"):
        _engine(pipe, False, tokenizer=False).add_request(prompts[0], _params(pipe, structured=SPECS[0]))


@pytest.mark.parametrize("overlap", [False, True])
def test_top_logprobs(pipe, prompts, overlap):
    reqs = [(prompts[0], _params(pipe, top_logprobs=5, ignore_eos=True)),
            (prompts[1], _params(pipe, ignore_eos=True)),
            (prompts[2], _params(pipe, top_logprobs=1, ignore_eos=True, max_new_tokens=5)),
            (prompts[3], _params(pipe, top_logprobs=20, ignore_eos=True, do_sample=True, seed=3,
                                 temperature=1.0))]
    got = _run(_engine(pipe, overlap), reqs)
    assert all(t is None for t in got[1]["top"])
    for r, k in zip([got[0], got[2], got[3]], (5, 1, 20)):
        for tok, lp, top in zip(r["tokens"], r["logprobs"], r["top"]):
            assert len(top) == k and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            assert len({i for i, _ in top}) == k
    for r in (got[0], got[2]):  # greedy: the chosen token first, with its own logprob
        assert [top[0] for top in r["top"]] == list(zip(r["tokens"], r["logprobs"]))
    plain = _run(_engine(pipe, overlap), [reqs[1]])[0]
    assert plain["tokens"] == got[1]["tokens"]


def test_top_logprobs_same_with_overlap_on_and_off(pipe, prompts):
    reqs = [(p, _params(pipe, top_logprobs=3 * i, ignore_eos=True, max_new_tokens=6 + i))
            for i, p in enumerate(prompts)]
    off, on = _run(_engine(pipe, False), reqs), _run(_engine(pipe, True), reqs)
    for a, b in zip(off, on):
        assert a["tokens"] == b["tokens"]
        for ta, tb in zip(a["top"], b["top"]):
            if ta is None:
                assert tb is None
                continue
            assert [i for i, _ in ta] == [i for i, _ in tb]
            np.testing.assert_allclose([x for _, x in ta], [x for _, x in tb], rtol=1e-5, atol=1e-5)


def test_pipeline_structured_and_top_logprobs(pipe):
    from mmserver import GenerationConfig

    r = pipe("Pick a side.", GenerationConfig(max_new_tokens=20, structured={"choice": ["left", "right"]},
                                              top_logprobs=2, logprobs=True))
    assert r.text in ("left", "right") and r.finish_reason == "stop"
    assert len(r.top_logprobs) == len(r.token_ids) and all(len(t) == 2 for t in r.top_logprobs)
    plain = pipe("Pick a side.", GenerationConfig(max_new_tokens=3, logprobs=True))
    assert plain.top_logprobs is None
    with pytest.raises(ValueError, match="invalid regex"):
        pipe("x", GenerationConfig(structured={"regex": "("}))
    assert not pipe.engine.has_work()
