"""The router's message handling, in-process: an abort always comes after its request, so
one for an unknown id means "already finished" and leaves no state behind, however often
that race happens."""

from __future__ import annotations

import torch

from ipc_fakes import EOS, FakeEngine, ListPipe, request
from mmserver.ipc import Abort, Failure, Outputs, RouterStats, Submit, Token
from mmserver.router.process import Router


def make_router(engine=None) -> tuple[Router, ListPipe]:
    sent = ListPipe()
    return Router(engine or FakeEngine(), sent, hidden=8, dtype=torch.float32), sent


def tokens(sent: list) -> list[Token]:
    return [t for msg in sent if isinstance(msg, Outputs) for t in msg]


def assert_nothing_kept(router: Router) -> None:
    assert router.awaiting_first == {} and router.engine.requests == {}


def test_one_message_per_step_with_every_requests_token():
    router, sent = make_router()
    router.handle(Submit(request(1, "ab")))
    router.handle(Submit(request(2, "c")))
    router.step()
    router.step()
    assert sent == [Outputs([1, 2], [ord("a"), ord("c")], [-0.5, -0.5], {2: "length"}),
                    Outputs([1], [ord("b")], [-0.5], {1: "length"})]
    assert [t.finished for t in tokens(sent)] == [False, True, True]
    assert router.first_tokens == 2
    assert_nothing_kept(router)


def test_abort_of_a_running_request_ends_it_silently():
    router, sent = make_router()
    router.handle(Submit(request(1, "abc")))
    router.step()
    router.handle(Abort(1))
    assert not router.engine.has_work() and len(tokens(sent)) == 1
    assert_nothing_kept(router)


def test_abort_before_the_first_token_clears_the_ttft_stamp():
    router, sent = make_router()
    router.handle(Submit(request(1, "abc")))
    router.handle(Abort(1))
    assert sent == []
    assert_nothing_kept(router)


def test_abort_after_finish_is_ignored_and_remembered_nowhere():
    router, sent = make_router()
    for rid in range(1, 101):  # a stop string seen by HTTP while the router ends the request on EOS
        router.handle(Submit(request(rid, f"x{chr(EOS)}")))
        router.step()
        router.step()
        router.handle(Abort(rid))
    assert [t.finish_reason for t in tokens(sent)].count("stop") == 100
    assert_nothing_kept(router)
    # nothing was kept, so nothing fills up: later requests and aborts behave the same
    router.handle(Submit(request(101, "ok")))
    router.handle(Abort(999))  # never seen here at all: ignored too
    router.step()
    assert tokens(sent)[-1] == Token(101, ord("o"), -0.5, None)


def test_a_request_refused_at_arrival_fails_without_state():
    router, sent = make_router()
    router.handle(Submit(request(1, "x" * 60, max_new_tokens=16)))
    assert sent == [Failure(1, "error", "exceeds max_req_total_len 64")]
    assert_nothing_kept(router)
    router.handle(Abort(1))  # HTTP's stream ended with the failure; a late abort is harmless
    assert_nothing_kept(router)


def test_stats_carry_what_metrics_render():
    router, _ = make_router()
    router.handle(Submit(request(1, "ab")))
    router.step()
    s = router.stats()
    assert isinstance(s, RouterStats) and s.kv_total == 64 and s.ttft_router_n == 1


def test_abort_after_finish_with_the_real_engine(pipe):
    """The same race against the engine itself: no error, no slot or request left."""
    from mmserver.engine.sampling import SamplingParams
    from mmserver.ipc import ServeRequest

    engine = pipe.engine
    router, sent = make_router(engine)
    ids = pipe.tokenizer.encode("hello there", add_special_tokens=False)
    router.handle(Submit(ServeRequest(1, ids, SamplingParams(max_new_tokens=2, ignore_eos=True))))
    while engine.has_work():
        router.step()
    assert [t.finished for t in tokens(sent)] == [False, True]
    router.handle(Abort(1))
    assert_nothing_kept(router)
    assert engine.kv.used == 0 and not engine.has_work()
    # its KV stays in the prefix cache; the stats say so
    stats = router.stats()
    assert stats.kv_used == 0 and stats.prompt_cache_tokens == engine.kv.cached >= len(ids)
