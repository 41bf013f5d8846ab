"""The prefix cache: the radix tree on its own, then the engine reusing KV across multi-turn
sessions with images, with the same greedy tokens and logprobs as without the cache."""

from __future__ import annotations

import numpy as np
import pytest

from mmserver import GenerationConfig
from mmserver.engine.engine import Engine, EngineConfig
from mmserver.engine.prefix_cache import PrefixCache
from mmserver.engine.request import RequestError
from mmserver.engine.sampling import SamplingParams

from conftest import random_image

# ---------------------------------------------------------------------------------------
# The radix tree


def _slots(*values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def test_insert_match_split_and_duplicates():
    c = PrefixCache()
    assert c.insert([1, 2, 3, 4], _slots(10, 11, 12, 13)) == 0
    node, slots = c.match([1, 2, 9])
    assert slots.tolist() == [10, 11] and c.size == 4  # the edge was split at the mismatch
    assert c.insert([1, 2, 5], _slots(20, 21, 22)) == 2  # 20, 21 duplicate cached positions: the caller frees them
    assert c.size == 5
    assert c.match([1, 2, 5, 6])[1].tolist() == [10, 11, 22]
    assert c.match([1, 2, 3, 4, 5], limit=3)[1].tolist() == [10, 11, 12]  # capped
    assert c.match([7])[1].tolist() == [] and c.match([7])[0] is c.root
    assert c.insert([1, 2, 3, 4], _slots(30, 31, 32, 33)) == 4  # all present: nothing taken
    c.check()


def test_image_keys_never_match_other_images_or_ids():
    c = PrefixCache()
    c.insert([1, ("md5a:max6", 0), ("md5a:max6", 1), 2], _slots(0, 1, 2, 3))
    assert len(c.match([1, ("md5b:max6", 0), ("md5b:max6", 1), 2])[1]) == 1
    assert len(c.match([1, ("md5a:max1", 0)])[1]) == 1  # another tile cap: another embedding
    assert len(c.match([1, ("md5a:max6", 0), ("md5a:max6", 1), 2])[1]) == 4


def test_evict_lru_leaves_never_locked_ones():
    c = PrefixCache()
    c.insert([1, 2, 3], _slots(0, 1, 2))
    c.insert([1, 2, 4], _slots(0, 1, 5))
    c.insert([7, 8], _slots(6, 7))
    locked, _ = c.match([1, 2, 3])
    c.lock(locked)
    assert (c.size, c.locked, c.evictable) == (6, 3, 3)
    c.match([7, 8])  # more recent than [1, 2, 4]
    assert sorted(c.evict(1).tolist()) == [5]  # the least recently used unlocked leaf
    assert sorted(c.evict(10).tolist()) == [6, 7]  # all that is unlocked; the locked path stays
    assert c.size == 3 and c.evicted_tokens == 3
    c.unlock(locked)
    assert sorted(c.evict(10).tolist()) == [0, 1, 2] and c.size == 0
    c.check()


def test_lock_counts_shared_path_once():
    c = PrefixCache()
    c.insert([1, 2, 3, 4], _slots(0, 1, 2, 3))
    a, _ = c.match([1, 2, 3, 4])
    b, _ = c.match([1, 2, 9])
    assert c.unlocked_on_path(a) == 4
    c.lock(a)
    assert c.unlocked_on_path(b) == 0 and c.locked == 4
    c.lock(b)
    c.unlock(a)
    assert c.locked == 2  # b's two positions
    c.unlock(b)
    assert c.locked == 0
    with pytest.raises(RuntimeError):
        c.unlock(b)


# ---------------------------------------------------------------------------------------
# Multi-turn sessions in one Engine


def _encoded(pipe, cache: dict, seed: int, size: tuple[int, int], cap: int) -> tuple[list[int], list, list]:
    """A user turn with one image: its ids, the image's span (relative) and rows, and its key."""
    key = (seed, size, cap)
    if key not in cache:
        ids, px = pipe.prepare(f"<image>\nlook w{seed}", [random_image(*size, seed)], cap)
        cache[key] = (ids, pipe.family.find_spans(ids), pipe.encode(px))
    return cache[key]


def make_sessions(pipe, n_sessions: int, turns: int, seed: int) -> list[list[dict]]:
    """Random sessions: each turn appends ids (with an image in turn 0, sometimes two, and one
    more later) to the history; images repeat across sessions, at the same or another tile cap."""
    rng = np.random.default_rng(seed)
    encoded: dict = {}
    sessions = []
    for s in range(n_sessions):
        session = []
        for t in range(turns):
            ids, spans, rows, keys = [], [], [], []
            n_images = int(rng.integers(1, 3)) if t == 0 else int(t == turns - 1)
            for _ in range(n_images):
                img = int(rng.integers(0, 3))
                size, cap = [((448, 448), 1), ((640, 480), 1), ((640, 480), 2)][int(rng.integers(0, 3))]
                piece, piece_spans, piece_rows = _encoded(pipe, encoded, img, size, cap)
                spans += [(start + len(ids), n) for start, n in piece_spans]
                rows += piece_rows
                keys += [f"md5-{img}-{size}:max{cap}"] * len(piece_rows)
                ids += piece
            words = " ".join(f"w{int(x)}" for x in rng.integers(0, 300, size=int(rng.integers(2, 12))))
            ids += pipe.prepare(f"{'Q' if s % 3 else 'Same question'} {words if s % 3 else ''}")[0]
            session.append({"ids": ids, "spans": spans, "rows": rows, "keys": keys,
                            "max_new_tokens": int(rng.integers(2, 8))})
        sessions.append(session)
    return sessions


def run_sessions(eng: Engine, sessions: list[list[dict]], check=None) -> dict[tuple[int, int], dict]:
    """Run every session's turns in order, the sessions concurrently (turn t + 1 is submitted
    when turn t finishes, its prompt the history plus turn t's answer). Per (session, turn):
    prompt, tokens, logprobs, prompt_cache_len."""
    import torch

    live: dict[int, tuple[int, int]] = {}
    history = [{"ids": [], "spans": [], "rows": [], "keys": []} for _ in sessions]
    results: dict[tuple[int, int], dict] = {}

    def submit(s: int, t: int) -> None:
        h, turn = history[s], sessions[s][t]
        h["spans"] = h["spans"] + [(a + len(h["ids"]), n) for a, n in turn["spans"]]
        h["ids"] = h["ids"] + turn["ids"]
        h["rows"] = h["rows"] + turn["rows"]
        h["keys"] = h["keys"] + turn["keys"]
        images = {"image_embeds": torch.cat(h["rows"]), "image_spans": h["spans"],
                  "image_keys": h["keys"]} if h["rows"] else {}
        rid = eng.add_request(h["ids"], SamplingParams(max_new_tokens=turn["max_new_tokens"], ignore_eos=True),
                              **images)
        live[rid] = (s, t)
        results[s, t] = {"prompt": list(h["ids"]), "tokens": [], "logprobs": [], "cached": None}

    for s in range(len(sessions)):
        submit(s, 0)
    steps = 0
    while eng.has_work():
        for o in eng.step():
            s, t = live[o.req_id]
            r = results[s, t]
            r["tokens"].append(o.token_id)
            r["logprobs"].append(o.logprob)
            if o.prompt_cache_len is not None:
                r["cached"] = o.prompt_cache_len
            if o.finished:
                del live[o.req_id]
                history[s]["ids"] = history[s]["ids"] + r["tokens"]
                if t + 1 < len(sessions[s]):
                    submit(s, t + 1)
        if check is not None:
            check(eng)
        steps += 1
        assert steps < 2000
    return results


def _accounting(eng: Engine) -> None:
    kv = eng.kv
    assert kv.used + kv.free + kv.cached == kv.num_slots
    assert kv.used >= 0 and kv.cached <= kv.num_slots
    if eng.prefix_cache is not None:
        eng.prefix_cache.check()


def _engine(pipe, **cfg) -> Engine:
    return Engine(pipe.model.llm, EngineConfig(**{"max_total_tokens": 16384, "max_requests": 16,
                                                  "max_req_len": 2048, **cfg}))


@pytest.fixture(scope="module")
def sessions(pipe):
    return make_sessions(pipe, n_sessions=6, turns=3, seed=3)


@pytest.fixture(scope="module")
def reference(pipe, sessions):
    """Without the cache; nothing is ever cached."""
    eng = _engine(pipe, disable_dynamic_prompt_cache=True)
    out = run_sessions(eng, sessions, check=_accounting)
    assert eng.prefix_cache is None and eng.kv.cached == 0 and eng.kv.used == 0
    assert all(r["cached"] == 0 for r in out.values())
    return out


def assert_same_outputs(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k]["prompt"] == expected[k]["prompt"], k
        assert got[k]["tokens"] == expected[k]["tokens"], k
        np.testing.assert_allclose(got[k]["logprobs"], expected[k]["logprobs"], rtol=0, atol=1e-5)


def test_sessions_reuse_their_history(pipe, sessions, reference):
    """A roomy pool: every later turn's cached prefix covers the previous turn's prompt and
    answer but at most its last token; identical first turns share across sessions."""
    eng = _engine(pipe)
    got = run_sessions(eng, sessions, check=_accounting)
    assert_same_outputs(got, reference)
    for (s, t), r in got.items():
        if t:
            prev = got[s, t - 1]
            assert r["cached"] >= len(prev["prompt"]) + len(prev["tokens"]) - 1, (s, t)
            assert r["cached"] <= len(r["prompt"]) - 1
    # at idle: nothing used, the rest free or cached, and the cache holds every session's history
    assert eng.kv.used == 0 and not eng.has_work()
    assert eng.kv.free + eng.kv.cached == eng.kv.num_slots and eng.kv.cached > 0
    assert eng.prefix_cache.locked == 0 and eng.prefix_cache.evicted_tokens == 0
    assert eng.prefix_cache.hit_tokens == sum(r["cached"] for r in got.values())


@pytest.mark.parametrize("overlap", [False, True])
def test_evictions_chunks_and_overlap_give_the_same_outputs(pipe, sessions, reference, overlap):
    """A pool too small to keep every history (evictions mid-run), prompts split into chunks,
    with and without the overlap schedule."""
    biggest = max(len(r["prompt"]) + len(r["tokens"]) for r in reference.values())
    capacity = biggest + 1800  # some histories survive until their next turn, others are evicted
    eng = _engine(pipe, max_total_tokens=capacity, batch_max_tokens=200, overlap_schedule=overlap)
    used = []

    def check(e: Engine) -> None:
        _accounting(e)
        used.append(e.kv.used)

    got = run_sessions(eng, sessions, check=check)
    assert_same_outputs(got, reference)
    assert eng.prefix_cache.evicted_tokens > 0 and max(used) <= capacity
    assert eng.prefix_cache.hit_tokens > 1000
    assert eng.kv.used == 0 and eng.kv.free + eng.kv.cached == capacity


def test_a_different_image_reuses_nothing_from_its_first_token(pipe):
    eng = _engine(pipe)
    text = pipe.prepare("Describe the picture, please.")[0]
    outs = {}
    for name, seed, cap in [("a", 1, 1), ("b", 2, 1), ("a6", 1, 6), ("a_again", 1, 1)]:
        ids, px = pipe.prepare("<image>\nWhat is it?", [random_image(640, 480, seed)], cap)
        prompt = text + ids
        spans = [(len(text) + a, n) for a, n in pipe.family.find_spans(ids)]
        images = {"image_embeds": pipe.encode(px)[0], "image_spans": spans,
                  "image_keys": [f"md5-{seed}:max{cap}"]}
        eng.add_request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), **images)
        outs[name] = [o for _ in range(50) if eng.has_work() for o in eng.step()]
        alone = _engine(pipe, disable_dynamic_prompt_cache=True)
        alone.add_request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), **images)
        want = [o.token_id for _ in range(50) if alone.has_work() for o in alone.step()]
        assert [o.token_id for o in outs[name]] == want, name  # answers as its own image requires
        outs[name] = (outs[name][0].prompt_cache_len, spans[0][0], len(prompt))
    assert outs["a"][0] == 0
    assert outs["b"][0] == outs["b"][1]  # the text before the image, nothing from the image on
    assert outs["a6"][0] == outs["a6"][1]  # same bytes, another tile cap: another embedding
    assert outs["a_again"][0] == outs["a_again"][2] - 1  # everything but the last prompt token


def test_unkeyed_images_share_nothing_and_keys_are_checked(pipe):
    eng = _engine(pipe)
    ids, px = pipe.prepare("<image>\nWhat is it?", [random_image(448, 448, 5)], 1)
    images = pipe.image_inputs(ids, pipe.encode(px))  # no image_keys
    for _ in range(2):
        eng.add_request(ids, SamplingParams(max_new_tokens=2, ignore_eos=True), **images)
        first = [o for _ in range(20) if eng.has_work() for o in eng.step()][0]
    assert first.prompt_cache_len == images["image_spans"][0][0]
    with pytest.raises(RequestError, match="image keys"):
        eng.add_request(ids, SamplingParams(max_new_tokens=2), **images, image_keys=["a", "b"])


def test_abort_caches_what_was_computed(pipe):
    eng = _engine(pipe, batch_max_tokens=64)
    ids = pipe.prepare(" ".join(f"w{i}" for i in range(100)))[0]
    rid = eng.add_request(ids, SamplingParams(max_new_tokens=5, ignore_eos=True))
    eng.step()
    eng.step()  # two chunks of 64 prefilled
    eng.abort(rid)
    assert eng.kv.used == 0 and eng.kv.cached == 128
    eng.add_request(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
    out = [o for _ in range(20) if eng.has_work() for o in eng.step()]
    assert out[0].prompt_cache_len == 128


def test_pipeline_chat_reuses_the_history(ckpt):
    from mmserver import pipeline

    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True, logprobs=True)
    img, img2 = random_image(448, 448, 11), random_image(640, 480, 12)
    turns = [("what is it?", img), "and the colours?", ("compare with this one", [img2]), "thanks"]
    results = {}
    for on in (True, False):
        pipe = pipeline(ckpt, device="cpu", dtype="float32", disable_dynamic_prompt_cache=not on)
        sess = None
        results[on] = []
        for turn in turns:
            sess = pipe.chat(turn, session=sess, gen_config=gen)
            results[on].append(sess.response)
        assert pipe.engine.kv.used == 0 and (pipe.engine.kv.cached > 0) == on
    for a, b in zip(results[True], results[False]):
        assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
        assert b.prompt_cache_len == 0
    on = results[True]
    assert on[0].prompt_cache_len == 0
    for prev, cur in zip(on, on[1:]):
        # the re-rendered history matches at least the previous prompt (the answer is re-tokenized
        # from its text, so its ids may differ)
        assert prev.prompt_tokens - 1 <= cur.prompt_cache_len < cur.prompt_tokens


def test_embeds_digest_is_a_full_width_content_key():
    import torch

    from mmserver.frontend.embeds import digest

    a = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert digest(a) == digest(a.clone()) and len(digest(a)) == 64
    assert digest(a) != digest(a + 1e-6) != digest(a.view(4, 3)) != digest(a.to(torch.bfloat16))
