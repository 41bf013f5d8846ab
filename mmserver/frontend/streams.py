"""Per-request output streams in the HTTP process.

Token batches from the router, and failures from the router or the visual server, are
fanned out to one asyncio queue per request; each stream detokenizes incrementally,
applies stop strings (aborting the request when one matches) and yields events. Leaving a
stream early, for any reason, aborts the request and drops its cache references exactly
once. A request's abort goes on the pipe its Submit went on (ipc.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from ..ipc import Abort, Failure, ImageRef, Outputs, Sender, ServeRequest, Submit, Token, ToRouter, ToVisual
from .detokenize import IncrementalDetokenizer, TokenPieces, token_text
from .errors import BadRequest, HTTPError, Unavailable

_ERRORS: dict[str, Callable[[str], HTTPError]] = {
    "error": lambda m: HTTPError(m, 500), "invalid": BadRequest, "unavailable": Unavailable}


@dataclass
class TokenEvent:
    id: int
    text: str  # newly visible text (may be "" while a character or a possible stop string is incomplete)
    logprob: float
    special: bool
    count: int
    finished: bool = False
    finish_reason: str | None = None
    full_text: str | None = None
    top: list[tuple[int, float]] | None = None  # top_logprobs alternatives (id, logprob), best first
    prompt_cache_len: int = 0  # prompt tokens whose KV the router reused from its prefix cache


@dataclass
class Counters:
    requests: dict[str, int] = field(default_factory=dict)  # by outcome
    prompt_tokens: int = 0
    generated_tokens: int = 0
    # TTFT breakdown measured here: stage → [seconds, requests]
    stages: dict[str, list] = field(default_factory=dict)

    def outcome(self, name: str) -> None:
        self.requests[name] = self.requests.get(name, 0) + 1

    def stage(self, name: str, seconds: float) -> None:
        entry = self.stages.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1


class Streams:
    def __init__(self, tokenizer, to_router: Sender[ToRouter], to_visual: Sender[ToVisual] | None,
                 release: Callable[[list[ImageRef]], "asyncio.Future"]):
        self.tokenizer = tokenizer
        self.to_router = to_router
        self.to_visual = to_visual
        self.release = release
        self.queues: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self.counters = Counters()
        self.special_ids = set(tokenizer.all_special_ids)
        self.token_piece = TokenPieces(tokenizer)  # id → (text, UTF-8 bytes), for logprobs entries
        self._texts: dict[int, str] = {}  # token_text cache (bounded by the vocabulary)
        self.failure: str | None = None  # set when a worker died: every stream ends with an error

    def new_id(self) -> int:
        return next(self._ids)

    @property
    def in_flight(self) -> int:
        return len(self.queues)

    def dispatch(self, outs: Outputs) -> None:
        """One step's tokens; those of requests no longer streamed (stopped, gone) are dropped."""
        for tok in outs:
            q = self.queues.get(tok.req_id)
            if q is not None:
                q.put_nowait(tok)

    def fail(self, failure: Failure) -> None:
        q = self.queues.get(failure.req_id)
        if q is not None:
            q.put_nowait(failure)

    def fail_all(self, reason: str) -> None:
        self.failure = reason
        for rid, q in self.queues.items():
            q.put_nowait(Failure(rid, "unavailable", reason))

    async def run(self, req: ServeRequest, refs: list[ImageRef], skip_special: bool) -> AsyncIterator[TokenEvent]:
        """Submit `req` and yield one event per generated token; the last has finished=True."""
        if self.failure:
            await self.release(refs)
            raise Unavailable(f"server unhealthy: {self.failure}")
        q: asyncio.Queue = asyncio.Queue()
        self.queues[req.req_id] = q
        send = (self.to_visual if any(r.needs_vit for r in refs) else self.to_router).send
        finished = False  # set once the request has ended where it runs: nothing left to abort
        try:
            req.t_sent = time.monotonic()
            self.counters.stage("http_intake", req.t_sent - req.t_arrival)
            send(Submit(req))
            self.counters.prompt_tokens += len(req.input_ids)
            detok = IncrementalDetokenizer(self.tokenizer, skip_special, req.params.stop_sequences,
                                           prompt_ids=req.input_ids)
            count = cached = 0
            while True:
                item: Token | Failure = await q.get()
                if isinstance(item, Failure):
                    finished = True
                    raise _ERRORS[item.kind](item.message)
                tok, logprob, done, reason = item.token_id, item.logprob, item.finished, item.finish_reason
                if reason == "error":  # the engine's grammar refused a sampled token: a bug, not the client's
                    finished = True
                    raise HTTPError(f"structured output failed: the grammar refused sampled token {tok}", 500)
                count += 1
                if item.prompt_cache_len is not None:
                    cached = item.prompt_cache_len
                if count == 1:
                    self.counters.stage("total", time.monotonic() - req.t_arrival)
                self.counters.generated_tokens += 1
                text = detok.push(tok)
                if detok.stopped and not done:
                    done, reason = True, "stop"
                    send(Abort(req.req_id))  # the router may have finished it meanwhile: it ignores this
                if done:
                    finished = True
                    if not detok.stopped:
                        text += detok.flush()
                    yield TokenEvent(tok, text, logprob, tok in self.special_ids, count, True, reason, detok.text,
                                     item.top, prompt_cache_len=cached)
                    return
                yield TokenEvent(tok, text, logprob, tok in self.special_ids, count, top=item.top,
                                 prompt_cache_len=cached)
        finally:
            self.queues.pop(req.req_id, None)
            if not finished:  # client gone or error: stop the work and free its KV slots
                send(Abort(req.req_id))
            await self.release(refs)

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = token_text(self.tokenizer, token_id)
        return text
