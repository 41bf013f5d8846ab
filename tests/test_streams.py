"""The HTTP side's output streams, in-process: failures become the right status, aborts go on
the pipe the request went on, and a stop string racing the router's own finish (EOS) ends
the stream cleanly on both sides."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ipc_fakes import EOS, CharTokenizer, FakeEngine, ListPipe, image_ref, request
from mmserver.frontend.errors import BadRequest, HTTPError, Unavailable
from mmserver.frontend.streams import Streams
from mmserver.ipc import Abort, Failure, Outputs, Submit, Token
from mmserver.router.process import Router


class Harness:
    def __init__(self):
        self.to_router = ListPipe()
        self.to_visual = ListPipe()
        self.released: list = []
        self.streams = Streams(CharTokenizer(), self.to_router, self.to_visual, self._release)

    async def _release(self, refs) -> None:
        self.released.append(refs)

    def start(self, req, refs=()) -> tuple[asyncio.Task, list]:
        """Read the request's stream in a task, collecting its events."""
        events: list = []

        async def read():
            async for ev in self.streams.run(req, list(refs), skip_special=True):
                events.append(ev)

        return asyncio.ensure_future(read()), events


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("kind, error, status", [("invalid", BadRequest, 400), ("error", HTTPError, 500),
                                                 ("unavailable", Unavailable, 503)])
def test_failure_of_each_kind_gives_its_status(kind, error, status):
    async def scenario():
        h = Harness()
        task, events = h.start(request(1))
        await _settle()
        h.streams.fail(Failure(1, kind, "image 0: cannot decode"))
        with pytest.raises(error) as caught:
            await task
        return h, caught.value, events

    h, err, events = asyncio.run(scenario())
    assert err.status == status and err.message == "image 0: cannot decode" and events == []
    assert [type(m) for m in h.to_router] == [Submit]  # no abort: the request already ended where it failed
    assert h.released == [[]] and h.streams.in_flight == 0


def test_failure_after_tokens_ends_the_stream_with_the_error():
    async def scenario():
        h = Harness()
        task, events = h.start(request(1))
        await _settle()
        h.streams.dispatch(Outputs([1], [ord("a")], [-0.1], {}))
        h.streams.fail(Failure(1, "error", "the engine failed"))
        with pytest.raises(HTTPError, match="the engine failed"):
            await task
        return events

    events = asyncio.run(scenario())
    assert [e.text for e in events] == ["a"]


def test_fail_all_ends_every_open_stream_with_503():
    async def scenario():
        h = Harness()
        tasks = [h.start(request(rid))[0] for rid in (1, 2)]
        await _settle()
        h.streams.fail_all("router process is gone")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(Unavailable, match="server unhealthy: router process is gone"):
            await h.streams.run(request(3), [], skip_special=True).__anext__()
        return h, results

    h, results = asyncio.run(scenario())
    assert all(isinstance(r, Unavailable) and r.status == 503 for r in results)
    assert len(h.released) == 3 and h.streams.in_flight == 0


@pytest.mark.parametrize("needs_vit", [True, False])
def test_abort_goes_on_the_pipe_the_request_went_on(needs_vit):
    async def scenario():
        h = Harness()
        refs = [image_ref(7, needs_vit=needs_vit)]
        task, _ = h.start(request(1, images=tuple(refs)), refs)
        await _settle()
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        return h

    h = asyncio.run(scenario())
    used, unused = (h.to_visual, h.to_router) if needs_vit else (h.to_router, h.to_visual)
    assert [type(m) for m in used] == [Submit, Abort] and used[1] == Abort(1) and unused == []
    assert len(h.released) == 1 and h.streams.in_flight == 0


def test_tokens_of_a_request_no_longer_streamed_are_dropped():
    h = Harness()
    h.streams.dispatch(Outputs([5], [ord("a")], [0.0], {5: "length"}))
    h.streams.fail(Failure(5, "error", "late"))
    assert h.streams.in_flight == 0


def test_stop_string_racing_eos():
    """HTTP sees the stop string "!" in "hi!" while the router, a step ahead, has already ended
    the request on EOS: HTTP's abort reaches a router that no longer knows the request."""
    h = Harness()
    router_out = ListPipe()
    router = Router(FakeEngine(), router_out, hidden=8, dtype=torch.float32)
    req = request(1, f"hi!{chr(EOS)}", stop_sequences=["!"])

    async def scenario():
        task, events = h.start(req)
        await _settle()
        for msg in h.to_router:  # the pipe to the router
            router.handle(msg)
        h.to_router.clear()
        while router.engine.has_work():
            router.step()  # h, i, !, EOS: the router finishes the request on its own
        for msg in router_out[:3]:  # HTTP reads the first three steps...
            h.streams.dispatch(msg)
        await task
        h.streams.dispatch(router_out[3])  # ...and the EOS step after its stream has ended
        return events

    events = asyncio.run(scenario())
    assert [e.finished for e in events] == [False, False, True]
    assert events[-1].finish_reason == "stop" and events[-1].full_text == "hi"
    assert "".join(e.text for e in events) == "hi"
    assert list(router_out[3]) == [Token(1, EOS, -0.5, "stop")]
    assert h.to_router == [Abort(1)]
    router.handle(h.to_router.pop())  # arrives after the finish: ignored
    assert router.awaiting_first == {} and router.engine.requests == {}
    assert h.released == [[]] and h.streams.in_flight == 0
