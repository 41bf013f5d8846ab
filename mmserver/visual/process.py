"""The visual server: batches the images of incoming requests onto ViT worker groups,
records their embeddings in the cache, and forwards each request to the router once all
its images are encoded. An image already being encoded for another request is not
encoded twice."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from ..embed_cache.service import CacheClient
from ..ipc import ImageRef, ServeRequest
from .workers import BatchResult, LocalWorker, RemoteWorker, VitRunner, tp_encode, tp_follow

log = logging.getLogger("mmserver.visual")

STATS_INTERVAL_S = 0.2
MAX_REMEMBERED_ABORTS = 10000
MAX_REMEMBERED_DONE = 100000


@dataclass
class VitStats:
    batches: int = 0
    images: int = 0
    tiles: int = 0
    preprocess_s: float = 0.0
    encode_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    forwarded: int = 0  # requests sent on to the router
    forward_wait_s: float = 0.0  # their time here, arrival to forward


class VisualServer:
    def __init__(self, workers: list, cache: CacheClient, to_router: Connection, batch_size: int):
        self.workers = workers
        self.cache = cache
        self.to_router = to_router
        self.batch_size = batch_size
        self.jobs: deque[ImageRef] = deque()  # images to encode, in arrival order
        self.waiters: dict[int, list[int]] = {}  # record id → requests waiting for it
        self.pending: dict[int, tuple[ServeRequest, set[int]]] = {}  # req id → (request, records left)
        self.aborted: set[int] = set()
        # Records encoded here. A request that took its cache reference just before the
        # embedding was marked present still says needs_vit; its image bytes are gone by
        # then, and the embedding is valid while the request holds its reference.
        self.done: OrderedDict[int, None] = OrderedDict()
        self.stats = VitStats()

    def handle(self, msg: tuple) -> None:
        if msg[0] == "abort":
            if self.pending.pop(msg[1], None) is None and len(self.aborted) < MAX_REMEMBERED_ABORTS:
                self.aborted.add(msg[1])  # it may still be on its way here
            return
        req: ServeRequest = msg[1]
        if req.req_id in self.aborted:
            self.aborted.discard(req.req_id)
            return
        left = set()
        for ref in req.images:
            if not ref.needs_vit or ref.record_id in self.done:
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
        s.batches += 1
        s.images += len(res.done)
        s.tiles += res.tiles
        s.preprocess_s += res.preprocess_s
        s.encode_s += res.encode_s
        s.batch_sizes[len(res.done)] = s.batch_sizes.get(len(res.done), 0) + 1
        for rid in res.done:
            self.done[rid] = None
            if len(self.done) > MAX_REMEMBERED_DONE:
                self.done.popitem(last=False)
            self._resolve(rid)

    def _resolve(self, record_id: int) -> None:
        for req_id in self.waiters.pop(record_id, []):
            entry = self.pending.get(req_id)
            if entry is None:
                continue
            entry[1].discard(record_id)
            if not entry[1]:
                del self.pending[req_id]
                self._forward(entry[0])

    def _forward(self, req: ServeRequest) -> None:
        now = time.monotonic()
        self.stats.forwarded += 1
        self.stats.forward_wait_s += now - req.t_sent
        req.t_sent = now
        self.to_router.send(("req", req))

    def _fail(self, record_id: int, kind: str, message: str) -> None:
        """Fail every request waiting for this image: "invalid" (undecodable bytes) ends in a 400,
        naming the image's index in each request, "error" in a 500."""
        log.log(logging.INFO if kind == "invalid" else logging.WARNING, "image record %d failed (%s): %s",
                record_id, kind, message)
        for req_id in self.waiters.pop(record_id, []):
            entry = self.pending.pop(req_id, None)
            if entry is None:
                continue
            index = next((i for i, r in enumerate(entry[0].images) if r.record_id == record_id), 0)
            if kind == "invalid":
                reason = f"invalid:image {index}: {message}"
            else:
                reason = f"error:image {index} could not be encoded: {message}"
            self.to_router.send(("fail", req_id, reason))

    def metrics(self) -> dict:
        s = self.stats
        return {"vit_batches": s.batches, "vit_images": s.images, "vit_tiles": s.tiles,
                "vit_seconds": s.preprocess_s + s.encode_s, "vit_preprocess_seconds": s.preprocess_s,
                "vit_encode_seconds": s.encode_s, "vit_batch_sizes": dict(s.batch_sizes), "vit_queue": len(self.jobs),
                "ttft_visual_s": s.forward_wait_s, "ttft_visual_n": s.forwarded}


def serve_forever(server: VisualServer, from_http: Connection, to_http: Connection) -> None:
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
            to_http.send(("stats", server.metrics()))
            last_stats = now


# ---------------------------------------------------------------------------------------
# Process entries


def _load_encoder(args, tp=None):
    """The checkpoint's family and its vision encoder (this rank's shard), warmed up on CUDA."""
    import torch

    from ..models.registry import load_family

    device = args.resolved_device
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    family = load_family(args.model_dir)
    dtype = args.compute_dtype(family.config.torch_dtype)
    weights = family.load_weights(device, dtype, tp, components=("vision",), progress=False,
                                  workers=args.load_workers)
    encoder = family.build_encoder(weights, tp)
    if encoder.device.type == "cuda":
        # Compile the triton kernels and set up cuBLAS now (every tp rank alike), not in the
        # first requests' batches: two batches in flight must not race through a first compile.
        encoder.encode_images([family.warmup_input()])
        torch.cuda.synchronize(encoder.device)
    return family, encoder


def _runner(family, encoder, tp=None) -> VitRunner:
    encode = tp_encode(encoder, tp) if tp is not None and tp.size > 1 else encoder.encode_images
    return VitRunner(encode, family)


def _join_group(args, dp_rank: int, tp_rank: int, init_method: str):
    """Pick this rank's GPU (group-major) and join the group's tensor-parallel process group."""
    import torch

    from ..engine.tp import init_tp

    if args.resolved_device == "cuda":
        torch.cuda.set_device((dp_rank * args.visual_tp + tp_rank) % torch.cuda.device_count())
    tp = init_tp(tp_rank, args.visual_tp, init_method)
    if args.resolved_device == "cuda":  # init_tp picks rank % devices; groups after the first sit further on
        torch.cuda.set_device((dp_rank * args.visual_tp + tp_rank) % torch.cuda.device_count())
    return tp


def run_vit_leader(ready, args, dp_rank: int, init_method: str, jobs: Connection, results: Connection) -> None:
    """A worker group's rank 0 in its own process: batches in, BatchResults out."""
    tp = _join_group(args, dp_rank, 0, init_method)
    family, encoder = _load_encoder(args, tp)
    runner = _runner(family, encoder, tp)
    ready()
    try:
        while True:
            try:
                refs = jobs.recv()
            except EOFError:
                return
            results.send(runner.process(refs))
    finally:
        if tp.size > 1:
            import torch

            tp.broadcast(torch.tensor([-1], dtype=torch.int64, device=encoder.device))


def run_vit_follower(ready, args, dp_rank: int, tp_rank: int, init_method: str) -> None:
    tp = _join_group(args, dp_rank, tp_rank, init_method)
    _, encoder = _load_encoder(args, tp)
    ready()
    tp_follow(encoder, tp)


def run_visual(ready, args, from_http: Connection, to_router: Connection, to_http: Connection, cache_socket: str,
               remote: list[tuple[Connection, Connection]]) -> None:
    """The visual server. With `remote` worker pipes it only schedules; otherwise it runs the ViT itself."""
    if remote:
        workers = [RemoteWorker(to_w, from_w) for to_w, from_w in remote]
    else:
        family, encoder = _load_encoder(args)
        workers = [LocalWorker(_runner(family, encoder))]
    server = VisualServer(workers, CacheClient(cache_socket), to_router, args.visual_infer_batch_size)
    ready()
    serve_forever(server, from_http, to_http)
