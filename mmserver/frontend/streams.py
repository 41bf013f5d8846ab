"""Per-request output streams in the HTTP process.

Token batches from the router are fanned out to one asyncio queue per request; each
stream detokenizes incrementally, applies stop strings (aborting the request in the
router when one matches) and yields events. Leaving a stream early, for any reason,
aborts the request and drops its cache references exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import AsyncIterator, Callable

from ..ipc import ImageRef, ServeRequest, TokenOut
from .detokenize import IncrementalDetokenizer, token_text
from .errors import BadRequest, HTTPError, Unavailable

# A token of -1 ends a request with one of these finish reasons, "<kind>:<message>".
_FAILURES = {"error": lambda m: HTTPError(m, 500), "invalid": BadRequest, "unavailable": Unavailable}
_FAILURE_PREFIXES = tuple(f"{kind}:" for kind in _FAILURES)


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
    def __init__(self, tokenizer, to_router: Connection, to_visual: Connection | None,
                 release: Callable[[list[ImageRef]], "asyncio.Future"]):
        self.tokenizer = tokenizer
        self.to_router = to_router
        self.to_visual = to_visual
        self.release = release
        self.queues: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self.counters = Counters()
        self.special_ids = set(tokenizer.all_special_ids)
        self.failure: str | None = None  # set when a worker died: every stream ends with an error

    def new_id(self) -> int:
        return next(self._ids)

    @property
    def in_flight(self) -> int:
        return len(self.queues)

    def dispatch(self, outs: list[TokenOut]) -> None:
        for out in outs:
            q = self.queues.get(out[0])
            if q is not None:
                q.put_nowait(out)

    def fail_all(self, reason: str) -> None:
        self.failure = reason
        for rid, q in self.queues.items():
            q.put_nowait((rid, -1, 0.0, True, f"unavailable:{reason}"))

    async def run(self, req: ServeRequest, refs: list[ImageRef], skip_special: bool) -> AsyncIterator[TokenEvent]:
        """Submit `req` and yield one event per generated token; the last has finished=True."""
        if self.failure:
            await self.release(refs)
            raise Unavailable(f"server unhealthy: {self.failure}")
        q: asyncio.Queue = asyncio.Queue()
        self.queues[req.req_id] = q
        via_visual = any(r.needs_vit for r in refs)
        finished = False
        try:
            req.t_sent = time.monotonic()
            self.counters.stage("http_intake", req.t_sent - req.t_arrival)
            (self.to_visual if via_visual else self.to_router).send(("req", req))
            self.counters.prompt_tokens += len(req.input_ids)
            detok = IncrementalDetokenizer(self.tokenizer, skip_special, req.params.stop_sequences,
                                           prompt_ids=req.input_ids)
            count = 0
            while True:
                rid, tok, logprob, done, reason = await q.get()
                if reason is not None and reason.startswith(_FAILURE_PREFIXES):
                    kind, _, message = reason.partition(":")
                    finished = True
                    raise _FAILURES[kind](message)
                count += 1
                if count == 1:
                    self.counters.stage("total", time.monotonic() - req.t_arrival)
                self.counters.generated_tokens += 1
                text = detok.push(tok)
                if detok.stopped and not done:
                    done, reason = True, "stop"
                    self.to_router.send(("abort", req.req_id))
                if done:
                    finished = True
                    if not detok.stopped:
                        text += detok.flush()
                    yield TokenEvent(tok, text, logprob, tok in self.special_ids, count, True, reason, detok.text)
                    return
                yield TokenEvent(tok, text, logprob, tok in self.special_ids, count)
        finally:
            self.queues.pop(req.req_id, None)
            if not finished:  # client gone or error: stop the work and free its KV slots
                self.to_router.send(("abort", req.req_id))
                if via_visual and self.to_visual is not None:
                    self.to_visual.send(("abort", req.req_id))
            await self.release(refs)

    def token_text(self, token_id: int) -> str:
        return token_text(self.tokenizer, token_id)
