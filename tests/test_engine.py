"""Continuous batching, admission, chunked prefill, stopping and sampling in the engine."""

from __future__ import annotations

import pytest

from mmserver import GenerationConfig
from mmserver.engine.engine import Engine, EngineConfig
from mmserver.engine.sampling import SamplingParams
from mmserver.engine.admission import Footprint, peak_tokens


@pytest.fixture(scope="module")
def prompts(pipe, image_factory_module):
    """(ids, image keywords) of mixed requests: text-only, 1 tile, multi-tile, two images."""
    f = image_factory_module
    specs = [("Tell me a story.", []), ("<image>\nWhat is this?", [f(448, 448, 1)]),
             ("<image>\nDescribe.", [f(1280, 720, 2)]), ("A <image> and B <image>?", [f(200, 600, 3), f(500, 500, 4)]),
             ("short", [])]
    return [_inputs(pipe, *pipe.prepare(p, imgs)) for p, imgs in specs]


def _inputs(pipe, ids, pixels) -> tuple[list[int], dict]:
    """A prompt's ids and its `add_request` image keywords (embeddings from the pipeline's ViT)."""
    return ids, pipe.image_inputs(ids, pipe.encode(pixels))


@pytest.fixture(scope="module")
def image_factory_module():
    from conftest import random_image

    return random_image


def _params(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def _new_engine(pipe, **cfg) -> Engine:
    return Engine(pipe.model.llm, EngineConfig(**cfg))


def _run_alone(pipe, ids, images, n) -> list[int]:
    eng = _new_engine(pipe)
    eng.add_request(ids, _params(n), **images)
    out = []
    while eng.has_work():
        out += [o.token_id for o in eng.step()]
    return out


@pytest.fixture(scope="module")
def alone(pipe, prompts):
    lens = [9, 5, 7, 6, 3]
    return lens, [_run_alone(pipe, ids, images, n) for (ids, images), n in zip(prompts, lens)]


def test_requests_join_and_leave_independently(pipe, prompts, alone):
    lens, expected = alone
    eng = _new_engine(pipe)
    outputs: dict[int, list[int]] = {}
    rids: dict[int, int] = {}
    joins = {0: [0, 1], 2: [2], 4: [3, 4]}  # request i joins at step s
    running_sizes = []
    step = 0
    while step < 100 and (eng.has_work() or step <= max(joins)):
        for i in joins.get(step, []):
            ids, images = prompts[i]
            rids[eng.add_request(ids, _params(lens[i]), **images)] = i
        for o in eng.step():
            outputs.setdefault(rids[o.req_id], []).append(o.token_id)
        running_sizes.append(len(eng.running))
        step += 1
    assert [outputs[i] for i in range(len(prompts))] == expected
    assert max(running_sizes) >= 3  # they really ran together
    assert eng.kv.used == 0 and eng.table.free_rows == eng.config.max_requests


def test_chunked_prefill_gives_same_tokens(pipe, prompts, alone):
    lens, expected = alone
    eng = _new_engine(pipe, batch_max_tokens=100)  # the 9-tile prompt takes ~24 chunks
    rids = {eng.add_request(ids, _params(n), **images): i
            for i, ((ids, images), n) in enumerate(zip(prompts, lens))}
    outputs: dict[int, list[int]] = {}
    while eng.has_work():
        for o in eng.step():
            outputs.setdefault(rids[o.req_id], []).append(o.token_id)
    assert [outputs[i] for i in range(len(prompts))] == expected


def test_admission_never_overcommits_the_pool(pipe, prompts, alone):
    lens, expected = alone
    capacity = 2800  # the 9-tile prompt (~2330 tokens) cannot run beside the others
    eng = _new_engine(pipe, max_total_tokens=capacity)
    rids = {eng.add_request(ids, _params(n), **images): i
            for i, ((ids, images), n) in enumerate(zip(prompts, lens))}
    outputs: dict[int, list[int]] = {}
    waited = False
    while eng.has_work():
        for o in eng.step():
            outputs.setdefault(rids[o.req_id], []).append(o.token_id)
        waited |= bool(eng.waiting)
        assert eng.kv.used <= capacity
        assert peak_tokens([r.footprint for r in eng.running]) <= capacity
    assert waited
    assert [outputs[i] for i in range(len(prompts))] == expected


def test_peak_formula():
    # Two requests: (held 10, grows 5) and (held 4, grows 1). Peak is when the first has
    # grown 1 step beside the second (10+4+2) or at its own end (10+5) → 16.
    assert peak_tokens([Footprint(10, 5), Footprint(4, 1)]) == 16
    assert peak_tokens([Footprint(3, 0)]) == 3
    assert peak_tokens([]) == 0


def test_running_max_req_size(pipe, prompts):
    eng = _new_engine(pipe, max_requests=2)
    for ids, images in prompts:
        eng.add_request(ids, _params(2), **images)
    while eng.has_work():
        eng.step()
        assert len(eng.running) <= 2


def test_abort_frees_slots(pipe, prompts):
    eng = _new_engine(pipe)
    ids, images = prompts[2]
    rid = eng.add_request(ids, _params(50), **images)
    eng.step()
    assert eng.kv.used > 0
    eng.abort(rid)
    assert eng.kv.used == 0 and not eng.has_work()


def test_eos_stops_and_min_new_tokens_and_ignore_eos(pipe, prompts, alone):
    lens, expected = alone
    ids, images = prompts[0]
    eos = expected[0][2]  # pretend the third greedy token is EOS
    first = expected[0].index(eos)

    def run(**kw):
        eng = _new_engine(pipe)
        eng.add_request(ids, SamplingParams(max_new_tokens=9, stop_token_ids=[eos], **kw))
        outs = []
        while eng.has_work():
            outs += eng.step()
        return [o.token_id for o in outs], outs[-1].finish_reason

    toks, reason = run()
    assert toks == expected[0][: first + 1] and reason == "stop"
    toks, reason = run(ignore_eos=True)
    assert toks == expected[0] and reason == "length"
    # min_new_tokens masks EOS until reached, so the greedy path changes at that step.
    toks, _ = run(min_new_tokens=first + 2)
    assert toks[first] != eos


def test_stop_string_is_removed(pipe):
    prompt = "Tell me a story."
    full = pipe.generate(prompt, gen_config=GenerationConfig(max_new_tokens=10, ignore_eos=True))
    ascii_text = full.text  # random weights: any text; pick a stop string from its middle
    stop = ascii_text[len(ascii_text) // 2: len(ascii_text) // 2 + 2]
    assert stop
    cut = pipe.generate(prompt, gen_config=GenerationConfig(max_new_tokens=10, ignore_eos=True,
                                                            stop_sequences=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == ascii_text[: ascii_text.index(stop)]
    assert stop not in cut.text
    assert pipe.engine.kv.used == 0


def test_seed_reproducible(pipe):
    cfg = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, ignore_eos=True)
    a = pipe.generate("hello", gen_config=GenerationConfig(seed=1, **cfg)).token_ids
    b = pipe.generate("hello", gen_config=GenerationConfig(seed=1, **cfg)).token_ids
    c = pipe.generate("hello", gen_config=GenerationConfig(seed=2, **cfg)).token_ids
    assert a == b and a != c
    # a seeded request is unaffected by what else is in the batch
    batch = pipe.generate(["hello", "other words"], gen_config=GenerationConfig(seed=1, **cfg))
    assert batch[0].token_ids == a


def test_repetition_penalty_forbids_seen_tokens(pipe):
    pen = pipe.generate("abc abc abc", gen_config=GenerationConfig(max_new_tokens=12, ignore_eos=True,
                                                                   repetition_penalty=1e6))
    # a huge repetition penalty forbids every token already seen (prompt or output)
    prompt_ids = set(pipe.prepare("abc abc abc")[0])
    assert len(set(pen.token_ids)) == len(pen.token_ids)
    assert not prompt_ids & set(pen.token_ids)


def test_chat_call_applies_template(pipe, image_factory_module):
    img = image_factory_module(448, 448, 8)
    r = pipe(("what is it?", img), GenerationConfig(max_new_tokens=4, ignore_eos=True))
    ids, _ = pipe.prepare(pipe.family.render_chat([{"role": "user", "content": "<image>\nwhat is it?"}]), [img])
    assert r.prompt_tokens == len(ids)
    raw = pipe.generate(pipe.family.render_chat([{"role": "user", "content": "<image>\nwhat is it?"}]), images=[img],
                        gen_config=GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert r.token_ids == raw.token_ids
    batch = pipe([("what is it?", img), "and a text question"], GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert batch[0].token_ids == r.token_ids and len(batch) == 2
