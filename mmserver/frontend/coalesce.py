"""Merge the calls that queue up behind a slow one into a single call.

The HTTP process reaches the embed cache over one rpyc connection. One round trip per
request's alloc and per release serialised a burst of 64 requests behind ~128 round trips
(~55 ms of waiting per request in `scripts/bench_intake.py`); merged, a burst costs a few.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable, Generic, Sequence, TypeVar

A = TypeVar("A")
R = TypeVar("R")


class Coalescer(Generic[A, R]):
    """`await c(arg)` runs `call([arg, ...])` in `executor`: while one call is in flight, later
    args wait and then go together in the next call. `call` returns one result per arg, in order.

    A caller cancelled while its arg is queued or in flight does not stop the call (the cache
    must still see it); its result goes to `on_orphan`, so e.g. references it took are given back.
    Must be used from one event loop."""

    def __init__(self, executor: Executor, call: Callable[[list[A]], Sequence[R]],
                 on_orphan: Callable[[R], None] | None = None):
        self._executor = executor
        self._call = call
        self._on_orphan = on_orphan
        self._queue: list[tuple[A, asyncio.Future]] = []
        self._busy = False
        self.calls = 0  # calls made, for tests and metrics

    async def __call__(self, arg: A) -> R:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((arg, fut))
        if not self._busy:
            self._start()
        return await fut

    def _start(self) -> None:
        batch, self._queue = self._queue, []
        self._busy = True
        self.calls += 1
        done = asyncio.get_running_loop().run_in_executor(self._executor, self._call, [arg for arg, _ in batch])
        done.add_done_callback(lambda f: self._finish(batch, f))

    def _finish(self, batch: list[tuple[A, asyncio.Future]], done: asyncio.Future) -> None:
        self._busy = False
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        results = done.result() if error is None else [None] * len(batch)
        for (_, fut), result in zip(batch, results):
            if fut.done():  # the caller was cancelled
                if error is None and self._on_orphan is not None:
                    self._on_orphan(result)
            elif error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)
        if self._queue:
            self._start()
