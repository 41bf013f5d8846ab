"""The overlap schedule: step N+1 is launched before step N's tokens reach the host.

On CPU nothing runs concurrently, but every piece of the bookkeeping is the GPU's: sentinel
input ids filled from the previous step's device tokens, finish checks one step late, the
extra token of an EOS-stopped request dropped, length-ended requests left out. Each test
compares against the same engine without the overlap.
"""

from __future__ import annotations

import pytest
import torch

from mmserver.engine.engine import Engine
from mmserver.engine.model_runner import fill_pending_ids
from mmserver.engine.sampling import SamplingParams
from test_cuda_graphs import _assert_same, _engine, _generate, _requests


def _run(eng: Engine, requests: list[tuple[list[int], SamplingParams]], abort_at: dict[int, int] | None = None
         ) -> tuple[dict[int, list[int]], dict[int, str | None]]:
    """Tokens and finish reason per request index; request i is aborted after step abort_at[i]."""
    abort_at = abort_at or {}
    rids = {eng.add_request(ids, params): i for i, (ids, params) in enumerate(requests)}
    by_index = {i: rid for rid, i in rids.items()}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    reasons: dict[int, str | None] = {}
    step = 0
    while eng.has_work():
        for o in eng.step():
            i = rids[o.req_id]
            assert i not in reasons, f"request {i} got a token after it finished"
            tokens[i].append(o.token_id)
            if o.finished:
                reasons[i] = o.finish_reason
        step += 1
        for i, at in abort_at.items():
            if at == step:
                eng.abort(by_index[i])
        assert step < 200
    assert eng.kv.used == 0 and eng.table.free_rows == eng.config.max_requests  # nothing leaked
    return tokens, reasons


def _text_requests(pipe, n: int, seed: int) -> list[list[int]]:
    return [r["prompt_ids"] for r in _requests(pipe, n, seed=seed, images=False)]


@pytest.fixture(scope="module")
def greedy_tokens(pipe):
    """Prompts and their 12 greedy tokens without the overlap."""
    prompts = _text_requests(pipe, 4, seed=21)
    tokens, _ = _run(_engine(pipe, overlap_schedule=False),
                     [(p, SamplingParams(max_new_tokens=12, ignore_eos=True)) for p in prompts])
    return prompts, tokens


def test_tokens_arrive_one_step_later(pipe, greedy_tokens):
    prompts, expected = greedy_tokens
    eng = _engine(pipe, overlap_schedule=True)
    assert eng.overlap
    eng.add_request(prompts[0], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert eng.step() == []  # the prefill was launched; its token is still "on the device"
    assert eng.running[0].pending == 1
    got = [o.token_id for o in eng.step()]
    assert got == expected[0][:1]
    assert eng.running[0].pending == 1  # step 2 is in flight
    while eng.has_work():
        got += [o.token_id for o in eng.step()]
    assert got == expected[0][:3]


@pytest.mark.parametrize("emulate_graphs", [False, True])
@pytest.mark.parametrize("batch_max_tokens", [8192, 48])
def test_same_tokens_and_logprobs_with_joins(pipe, emulate_graphs, batch_max_tokens):
    """Requests (two with images) join over time; small chunks put pending decode rows beside prefill
    chunks; emulated graphs fill the sentinel ids inside the static inputs."""
    reqs = _requests(pipe, 9, seed=4)
    joins = {i: (i % 4) * 3 for i in range(9)}
    expected = _generate(_engine(pipe, overlap_schedule=False, batch_max_tokens=batch_max_tokens), reqs, joins)
    eng = _engine(pipe, emulate=emulate_graphs, overlap_schedule=True, batch_max_tokens=batch_max_tokens)
    _assert_same(_generate(eng, reqs, joins), expected)
    if emulate_graphs:
        assert eng.graphs.replays > 0
    assert eng.kv.used == 0


def test_eos_stop_drops_the_extra_token(pipe, greedy_tokens):
    prompts, expected = greedy_tokens
    eos = expected[0][4]
    first = expected[0].index(eos)
    reqs = [(prompts[0], SamplingParams(max_new_tokens=12, stop_token_ids=[eos])),
            (prompts[1], SamplingParams(max_new_tokens=12, ignore_eos=True)),
            (prompts[2], SamplingParams(max_new_tokens=12, stop_token_ids=[eos], min_new_tokens=first + 2))]
    want = _run(_engine(pipe, overlap_schedule=False), reqs)
    got = _run(_engine(pipe, overlap_schedule=True), reqs)
    assert got == want
    assert got[0][0] == expected[0][:first + 1] and got[1][0] == "stop"
    assert got[1][1] == "length" and len(got[0][2]) >= first + 2


def test_length_ends_without_an_extra_step(pipe, greedy_tokens, monkeypatch):
    """A request whose pending token is its last is left out of the next step: no wasted forward,
    and at max_req_len its last token is never fed back (the token table has no room for it)."""
    prompts, expected = greedy_tokens
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    max_len = len(prompts[longest]) + 12  # that request ends exactly at max_req_len
    reqs = [(p, SamplingParams(max_new_tokens=12 - 3 * (i % 2 and i != longest), ignore_eos=True))
            for i, p in enumerate(prompts)]
    forwards = []
    llm = pipe.model.llm
    monkeypatch.setattr(llm, "forward", lambda *a, _f=llm.forward: forwards.append(1) or _f(*a))
    results = []
    for overlap in (False, True):
        forwards.clear()
        results.append((_run(_engine(pipe, overlap_schedule=overlap, max_req_len=max_len), reqs), len(forwards)))
    assert results[0] == results[1]
    (tokens, reasons), _ = results[1]
    assert tokens[longest] == expected[longest] and set(reasons.values()) == {"length"}


def test_abort_while_a_token_is_in_flight(pipe, greedy_tokens):
    prompts, expected = greedy_tokens
    reqs = [(p, SamplingParams(max_new_tokens=12, ignore_eos=True)) for p in prompts[:3]]
    eng = _engine(pipe, overlap_schedule=True)
    tokens, reasons = _run(eng, reqs, abort_at={1: 4})
    assert 1 not in reasons and len(tokens[1]) == 3  # steps 2-4 returned tokens 1-3; the 4th was in flight
    assert tokens[1] == expected[1][:3]
    assert tokens[0] == expected[0] and tokens[2] == expected[2]


def test_penalties_and_seeded_sampling_match(pipe, greedy_tokens):
    """A penalised request needs its tokens on the host: those steps resolve before launching."""
    prompts, _ = greedy_tokens
    reqs = [(prompts[0], SamplingParams(max_new_tokens=10, ignore_eos=True, repetition_penalty=1.3,
                                        frequency_penalty=0.5)),
            (prompts[1], SamplingParams(max_new_tokens=10, ignore_eos=True, do_sample=True, temperature=0.8,
                                        top_p=0.9, seed=7)),
            (prompts[2], SamplingParams(max_new_tokens=10, ignore_eos=True))]
    want = _run(_engine(pipe, overlap_schedule=False), reqs)
    assert _run(_engine(pipe, overlap_schedule=True), reqs) == want
    # without the penalised request every step overlaps, and sampling is still the same
    assert _run(_engine(pipe, overlap_schedule=True), reqs[1:]) == _run(_engine(pipe, overlap_schedule=False),
                                                                         reqs[1:])


def test_fill_pending_ids():
    ids = torch.tensor([5, -1, 7, -3, -2])
    fill_pending_ids(ids, torch.tensor([10, 11, 12]))
    assert ids.tolist() == [5, 10, 7, 12, 11]
