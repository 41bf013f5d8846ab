"""The visual server: batches the images of incoming requests onto ViT worker groups,
records their embeddings in the cache, and forwards each request to the router once all
its images are encoded. An image already being encoded for another request is not
encoded twice.

Aborts come on the pipe that brought the requests, after them. A request still waiting
here is dropped (with its images' jobs, when no other request waits for them and no
worker has them yet); any other is forwarded or already ended, so the abort follows it to
the router.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from multiprocessing.connection import Connection, wait
from typing import Protocol

from ..ipc import Abort, Failure, FromVisual, ImageRef, Sender, ServeRequest, Submit, ToRouter, ToVisual, VisualStats
from .workers import BatchResult

log = logging.getLogger("mmserver.visual")

STATS_INTERVAL_S = 0.2
MAX_REMEMBERED_DONE = 100000


class Worker(Protocol):
    """A ViT worker group as the server sees it (workers.LocalWorker, workers.RemoteWorker)."""

    conn: Connection  # readable when a batch result is ready
    busy: bool

    def prefetch(self, ref: ImageRef) -> None: ...
    def forget(self, record_id: int) -> None: ...
    def dispatch(self, refs: list[ImageRef]) -> None: ...
    def poll(self) -> BatchResult | None: ...


class Cache(Protocol):
    def mark_embedding(self, ids: list[int]) -> None: ...


class VisualServer:
    def __init__(self, workers: list[Worker], cache: Cache, to_router: Sender[ToRouter], to_http: Sender[FromVisual],
                 batch_size: int):
        self.workers = workers
        self.cache = cache
        self.to_router = to_router
        self.to_http = to_http
        self.batch_size = batch_size
        self.jobs: deque[ImageRef] = deque()  # images to encode, in arrival order, not yet dispatched
        # record id → requests waiting for it, for every record queued in `jobs` or in a worker
        # (an encoding no request waits for any more keeps an empty list until it comes back)
        self.waiters: dict[int, list[int]] = {}
        self.pending: dict[int, tuple[ServeRequest, set[int]]] = {}  # req id → (request, records left)
        # Records encoded here. A request that took its cache reference just before the
        # embedding was marked present still says needs_vit; its image bytes are gone by
        # then, and the embedding is valid while the request holds its reference.
        self.done: OrderedDict[int, None] = OrderedDict()
        self.stats = VisualStats()

    def handle(self, msg: ToVisual) -> None:
        match msg:
            case Submit(req):
                self._submit(req)
            case Abort(req_id):
                self._abort(req_id)
            case _:
                raise TypeError(f"visual server: unexpected message {msg!r}")

    def _submit(self, req: ServeRequest) -> None:
        left: set[int] = set()
        for ref in req.images:
            if not ref.needs_vit or ref.record_id in self.done or ref.record_id in left:
                continue
            left.add(ref.record_id)
            if ref.record_id not in self.waiters:
                self.waiters[ref.record_id] = []
                self.jobs.append(ref)
                if len(self.workers) == 1:  # its only possible worker: start decoding and tiling now
                    self.workers[0].prefetch(ref)
            self.waiters[ref.record_id].append(req.req_id)
        if left:
            self.pending[req.req_id] = (req, left)
        else:
            self._forward(req)

    def _abort(self, req_id: int) -> None:
        entry = self.pending.pop(req_id, None)
        if entry is None:  # forwarded (or failed) already: the abort goes behind it
            self.to_router.send(Abort(req_id))
            return
        self._unwait(req_id, entry[1])

    def _unwait(self, req_id: int, records: set[int]) -> None:
        """A request no longer waits for these records."""
        for record_id in records:
            waiting = self.waiters[record_id]
            waiting.remove(req_id)
            if not waiting and self._unqueue(record_id):
                del self.waiters[record_id]

    def _unqueue(self, record_id: int) -> bool:
        """Take a record's job off the queue, if no worker has it yet."""
        for ref in self.jobs:
            if ref.record_id == record_id:
                self.jobs.remove(ref)
                for w in self.workers:
                    w.forget(record_id)  # drop its prefetched tiles
                return True
        return False

    def dispatch(self) -> None:
        """Give each idle worker group the next batch of images."""
        for w in self.workers:
            if not self.jobs:
                return
            if not w.busy:
                w.dispatch([self.jobs.popleft() for _ in range(min(self.batch_size, len(self.jobs)))])

    def collect(self) -> None:
        for w in self.workers:
            result = w.poll()
            if result is not None:
                self._finish(result)

    def _finish(self, res: BatchResult) -> None:
        for record_id, kind, message in res.failed:
            self._fail(record_id, kind, message)
        if res.done:
            self.cache.mark_embedding(res.done)
        s = self.stats
        s.vit_images += len(res.done)
        s.vit_tiles += res.tiles
        s.vit_preprocess_seconds += res.preprocess_s
        s.vit_encode_seconds += res.encode_s
        s.vit_seconds += res.preprocess_s + res.encode_s
        s.vit_batch_sizes[len(res.done)] = s.vit_batch_sizes.get(len(res.done), 0) + 1
        for rid in res.done:
            self.done[rid] = None
            if len(self.done) > MAX_REMEMBERED_DONE:
                self.done.popitem(last=False)
            self._resolve(rid)

    def _resolve(self, record_id: int) -> None:
        for req_id in self.waiters.pop(record_id, []):
            req, left = self.pending[req_id]
            left.discard(record_id)
            if not left:
                del self.pending[req_id]
                self._forward(req)

    def _forward(self, req: ServeRequest) -> None:
        now = time.monotonic()
        self.stats.ttft_visual_n += 1
        self.stats.ttft_visual_s += now - req.t_sent
        req.t_sent = now
        self.to_router.send(Submit(req))

    def _fail(self, record_id: int, kind: str, message: str) -> None:
        """Fail every request waiting for this image, straight to HTTP: "invalid" (undecodable
        bytes) ends in a 400, naming the image's index in each request, "unavailable" (no
        remote encoder could take it) in a 503, "error" in a 500."""
        log.log(logging.INFO if kind == "invalid" else logging.WARNING, "image record %d failed (%s): %s",
                record_id, kind, message)
        for req_id in self.waiters.pop(record_id, []):
            req, left = self.pending.pop(req_id)
            self._unwait(req_id, left - {record_id})
            index, ref = next(((i, r) for i, r in enumerate(req.images) if r.record_id == record_id), (0, None))
            label = (ref.label if ref is not None else "") or f"image {index}"
            if kind == "invalid":
                self.to_http.send(Failure(req_id, "invalid", f"{label}: {message}"))
            elif kind == "unavailable":
                self.to_http.send(Failure(req_id, "unavailable", f"{label}: {message}"))
            else:
                self.to_http.send(Failure(req_id, "error", f"{label} could not be encoded: {message}"))


def serve_forever(server: VisualServer, from_http: Connection) -> None:
    last_stats = 0.0
    worker_conns = [w.conn for w in server.workers]
    while True:
        idle_ready = server.jobs and any(not w.busy for w in server.workers)
        for conn in wait([from_http, *worker_conns], 0 if idle_ready else STATS_INTERVAL_S):
            if conn is from_http:
                while conn.poll():
                    try:
                        server.handle(conn.recv())
                    except EOFError:
                        return
        server.collect()
        server.dispatch()
        now = time.monotonic()
        if now - last_stats >= STATS_INTERVAL_S:
            for w in server.workers:
                if hasattr(w, "states"):  # remote encoders: their up/down state for /health and /metrics
                    server.stats.remote_encoders = w.states()
            server.to_http.send(server.stats)
            last_stats = now
