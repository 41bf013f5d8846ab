"""The request pipeline every generation route shares, between parsing and responding:
admit (health, overload), load images, tokenize, check the length, take cache references,
then run the generations and merge their token events.

A request with `n` samples becomes n engine requests here, each with its own id, so the
engine, router and streams never see `n`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import AsyncIterator

from ..engine.sampling import SamplingParams
from ..frontend.errors import BadRequest, Overloaded, Unavailable
from ..frontend.streams import TokenEvent
from ..ipc import ImageRef, ServeRequest
from .common import AppState
from .schemas import GenerateRequest

_MAX_SEED = 2**63


@dataclass
class Submission:
    """One engine request, ready for `Streams.run`; its stream releases `refs`."""

    serve: ServeRequest
    refs: list[ImageRef]
    skip_special: bool


def admit(state: AppState, count: int = 1) -> None:
    """Refuse early when the server cannot take `count` more generations."""
    if (reason := state.health()) is not None:
        raise Unavailable(f"server unhealthy: {reason}")
    if count > state.max_waiting:
        raise BadRequest(f"the request asks for {count} generations; at most {state.max_waiting} "
                         f"(--max_waiting_requests) can be in flight")
    if state.streams.in_flight + count > state.max_waiting:
        raise Overloaded(f"server overloaded: {state.streams.in_flight} requests in flight")


async def prepare(state: AppState, req: GenerateRequest, *, n: int = 1, fit_to_context: bool = False,
                  arrival: float | None = None, admitted: bool = False) -> list[Submission]:
    """Validate, load images, tokenize and take cache references for `n` samples of `req`.

    Sample i of a request with seed s gets seed s + i (reproducible, yet distinct samples).
    With `fit_to_context`, max_new_tokens is lowered to the room the prompt leaves in
    max_req_total_len (OpenAI's "no max_tokens given")."""
    if not admitted:
        admit(state, n)
    if (req.images or req.videos) and not state.multimodal:
        what = "images" if req.images else "videos"
        raise BadRequest(f"{what} were sent but the server was started without --enable_multimodal")
    images = await state.intake.load_images(req.images, req.image_options)
    videos = await state.intake.load_videos(req.videos, req.image_options)
    if req.input_ids is not None:  # token ids (completions): text only, nothing to expand
        ids, spans, media, keys = req.input_ids, [], [], []
    else:
        layout = state.intake.tokenize(req.inputs, images, videos)
        ids, spans, media, keys = layout.ids, layout.spans, layout.media, layout.keys
    if not ids:
        raise BadRequest("the prompt is empty (0 tokens)")
    if fit_to_context:
        _fit_max_new_tokens(req.params, len(ids), state.intake.limits.max_req_len)
    state.intake.check_length(len(ids), req.params.max_new_tokens)
    subs: list[Submission] = []
    t_arrival = arrival if arrival is not None else time.monotonic()
    try:
        for params in sample_params(req.params, n):
            refs = await state.intake.take_cache_refs(media)  # one reference per sample: each stream drops its own
            serve = ServeRequest(state.streams.new_id(), ids, params, refs, spans, image_keys=keys,
                                 t_arrival=t_arrival)
            subs.append(Submission(serve,
                                   refs, req.skip_special_tokens))
    except BaseException:
        await release(state, subs)
        raise
    return subs


def sample_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    if n == 1:
        return [params]
    if params.seed is not None and params.seed + n - 1 >= _MAX_SEED:
        raise BadRequest(f"seed {params.seed} + n - 1 must be < 2**63 (sample i uses seed + i)")
    return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + i,
                                stop_sequences=list(params.stop_sequences)) for i in range(n)]


def _fit_max_new_tokens(params: SamplingParams, n_prompt: int, max_req_len: int) -> None:
    room = max_req_len - n_prompt
    if room >= 1:  # otherwise check_length names the problem
        params.max_new_tokens = min(params.max_new_tokens, room)
        params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)


async def release(state: AppState, subs: list[Submission]) -> None:
    for sub in subs:
        await state.intake.release(sub.refs)


async def run(state: AppState, sub: Submission) -> AsyncIterator[TokenEvent]:
    """`Streams.run` for one submission, observed by the /metrics request histograms.

    Closing this generator closes the stream (abort, references dropped). It must be
    started (or `release`d) once made: an async generator that never ran has no finally."""
    timer = state.metrics.timer(sub.serve.t_arrival, len(sub.serve.input_ids))
    async with contextlib.aclosing(state.streams.run(sub.serve, sub.refs, sub.skip_special)) as events:
        async for ev in events:
            timer.token(ev, sub.serve.t_sent)
            yield ev


async def merged(state: AppState, subs: list[Submission]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(index, event) from every submission's stream as they come, until all have finished.

    An error from any stream is raised here, and leaving early (error, client gone) aborts
    every generation still running. Close it with `contextlib.aclosing`."""
    if len(subs) == 1:  # the common case: no tasks, no queue
        async with contextlib.aclosing(run(state, subs[0])) as events:
            async for ev in events:
                yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    started = [False] * len(subs)

    async def pump(i: int) -> None:
        started[i] = True  # from here on the stream's own finally releases the references
        try:
            async with contextlib.aclosing(run(state, subs[i])) as events:
                async for ev in events:
                    queue.put_nowait((i, ev))
        except Exception as e:  # noqa: BLE001 — handed to the consumer, which raises it
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(subs))]
    finished = [False] * len(subs)
    try:
        while not all(finished):
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            finished[i] = item.finished
            yield i, item
    finally:
        # Abort what still runs; a finished stream's task is only releasing its references:
        # let it (cancelling it there could lose the release).
        for t, done in zip(tasks, finished):
            if not done:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A task cancelled before its first step never started its stream: release its references.
        await release(state, [s for s, ok in zip(subs, started) if not ok])
