"""The visual server: batches images of incoming requests through the ViT, writes their
embeddings into the cache's shared memory, and forwards each request to the router once
all its images are encoded. An image already being encoded for another request is not
encoded twice."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import torch

from ..embed_cache import shm
from ..embed_cache.service import CacheClient
from ..models.internvl.preprocess import ImageError, load_image, preprocess_image
from ..router.messages import ImageRef, ServeRequest
from .workers import EncoderPool

log = logging.getLogger("mmserver.visual")

STATS_INTERVAL_S = 0.2
MAX_REMEMBERED_ABORTS = 10000


@dataclass
class VitStats:
    batches: int = 0
    images: int = 0
    tiles: int = 0
    seconds: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)


class VisualServer:
    def __init__(self, encoders: EncoderPool, cache: CacheClient, to_router: Connection, batch_size: int,
                 min_patch: int, use_thumbnail: bool):
        self.encoders = encoders
        self.cache = cache
        self.to_router = to_router
        self.batch_size = batch_size
        self.min_patch = min_patch
        self.use_thumbnail = use_thumbnail
        self.jobs: deque[ImageRef] = deque()  # images to encode, in arrival order
        self.waiters: dict[int, list[int]] = {}  # record id → requests waiting for it
        self.pending: dict[int, tuple[ServeRequest, set[int]]] = {}  # req id → (request, records left)
        self.aborted: set[int] = set()
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
            if not ref.needs_vit:
                continue
            left.add(ref.record_id)
            if ref.record_id not in self.waiters:
                self.waiters[ref.record_id] = []
                self.jobs.append(ref)
            self.waiters[ref.record_id].append(req.req_id)
        if left:
            self.pending[req.req_id] = (req, left)
        else:
            self.to_router.send(("req", req))

    def has_work(self) -> bool:
        return bool(self.jobs)

    def run_batch(self) -> None:
        batch = [self.jobs.popleft() for _ in range(min(self.batch_size, len(self.jobs)))]
        t0 = time.perf_counter()
        tiles, ok = [], []
        for ref in batch:
            try:
                tiles.append(self._tiles(ref))
                ok.append(ref)
            except (ImageError, FileNotFoundError, ValueError) as e:
                self._fail(ref.record_id, f"image could not be encoded: {e}")
        if not ok:
            return
        feats = self.encoders.encode(torch.cat(tiles))
        feats = feats.reshape(-1, feats.shape[-1])
        start = 0
        done = []
        for ref in ok:
            rows = feats[start:start + ref.n_tokens]
            start += ref.n_tokens
            if self._write(ref, rows):
                done.append(ref.record_id)
            else:
                self._fail(ref.record_id, "image record was evicted before its embedding was written")
        self.cache.mark_embedding(done)
        s = self.stats
        s.batches += 1
        s.images += len(ok)
        s.tiles += sum(t.shape[0] for t in tiles)
        s.seconds += time.perf_counter() - t0
        s.batch_sizes[len(ok)] = s.batch_sizes.get(len(ok), 0) + 1
        for rid in done:
            self._resolve(rid)

    def _tiles(self, ref: ImageRef) -> torch.Tensor:
        seg = shm.attach(ref.img_name)
        try:
            data = bytes(seg.buf[:ref.img_bytes])
        finally:
            seg.close()
        tiles = preprocess_image(load_image(data), max_num=ref.max_patch, min_num=self.min_patch,
                                 use_thumbnail=self.use_thumbnail)
        expected = ref.n_tokens // self.encoders.tokens_per_tile
        if tiles.shape[0] != expected:
            raise ValueError(f"image gave {tiles.shape[0]} tiles, the prompt reserved {expected}")
        return tiles

    @staticmethod
    def _write(ref: ImageRef, rows: torch.Tensor) -> bool:
        try:
            seg = shm.attach(ref.emb_name)
        except FileNotFoundError:
            return False
        try:
            shm.tensor_view(seg, tuple(rows.shape), rows.dtype).copy_(rows.cpu())
        finally:
            seg.close()
        return True

    def _resolve(self, record_id: int) -> None:
        for req_id in self.waiters.pop(record_id, []):
            entry = self.pending.get(req_id)
            if entry is None:
                continue
            entry[1].discard(record_id)
            if not entry[1]:
                del self.pending[req_id]
                self.to_router.send(("req", entry[0]))

    def _fail(self, record_id: int, message: str) -> None:
        for req_id in self.waiters.pop(record_id, []):
            if self.pending.pop(req_id, None) is not None:
                self.to_router.send(("fail", req_id, message))

    def metrics(self) -> dict:
        s = self.stats
        return {"vit_batches": s.batches, "vit_images": s.images, "vit_tiles": s.tiles, "vit_seconds": s.seconds,
                "vit_batch_sizes": dict(s.batch_sizes), "vit_queue": len(self.jobs)}


def serve_forever(server: VisualServer, from_http: Connection, to_http: Connection) -> None:
    last_stats = 0.0
    while True:
        for conn in wait([from_http], 0 if server.has_work() else STATS_INTERVAL_S):
            while conn.poll():
                try:
                    server.handle(conn.recv())
                except EOFError:
                    return
        if server.has_work():
            server.run_batch()
        now = time.monotonic()
        if now - last_stats >= STATS_INTERVAL_S:
            to_http.send(("stats", server.metrics()))
            last_stats = now


def run_visual(ready, args, from_http: Connection, to_router: Connection, to_http: Connection,
               cache_socket: str) -> None:
    """Process entry: load the vision encoder, connect to the cache, report ready, serve."""
    from ..models.internvl.config import load_config
    from ..models.internvl.vision import VisionEncoder
    from ..models.internvl.weights import load_weights
    from ..pipeline import resolve_dtype

    device = args.resolved_device
    cfg = load_config(args.model_dir)
    dtype = resolve_dtype(args.data_type or "auto", device, cfg.torch_dtype)
    weights = load_weights(args.model_dir, cfg, device=device, dtype=dtype, progress=False, components=("vision",))
    pool = EncoderPool(VisionEncoder(cfg, weights), cfg.image_tokens_per_tile)
    server = VisualServer(pool, CacheClient(cache_socket), to_router, args.visual_infer_batch_size,
                          cfg.min_dynamic_patch, cfg.use_thumbnail)
    ready()
    serve_forever(server, from_http, to_http)
