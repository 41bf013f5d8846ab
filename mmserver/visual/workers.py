"""Where the ViT runs: `visual_dp` groups of `visual_tp` ranks.

A group leader takes a batch of image records, preprocesses them, runs the encoder (its
tensor-parallel followers run the same tiles, sent by broadcast) and writes each image's
embedding into its shared-memory segment. With one group of one rank the leader is a plain
object inside the visual server's process; otherwise each leader is a process of its own.
"""

from __future__ import annotations

import os
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing import Pipe
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Callable

import torch

from ..embed_cache import shm
from ..models.internvl.preprocess import ImageError, load_image, tile_pixels
from ..ipc import ImageRef


@dataclass
class BatchResult:
    done: list[int] = field(default_factory=list)  # record ids whose embedding is written
    # (record id, "invalid" (the client's image is bad: a 400) or "error", message without an image index)
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    tiles: int = 0
    preprocess_s: float = 0.0
    encode_s: float = 0.0


def default_preprocess_threads() -> int:
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class VitRunner:
    """Preprocess → encode → write, for one group leader.

    `prefetch` starts an image's decoding and tiling as soon as it arrives, before it is
    batched; `process` uses that work (or does it then) and runs the batch's forward."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], tokens_per_tile: int, min_patch: int,
                 use_thumbnail: bool, preprocess_threads: int | None = None):
        self.encode = encode
        # PIL decodes and resizes without the GIL: images are prepared in parallel.
        self.pool = ThreadPoolExecutor(max_workers=preprocess_threads or default_preprocess_threads(),
                                       thread_name_prefix="vit-preprocess")
        self._prefetched: dict[int, Future] = {}  # record id → its tiles (or failure), being prepared
        self.tokens_per_tile = tokens_per_tile
        self.min_patch = min_patch
        self.use_thumbnail = use_thumbnail

    def prefetch(self, ref: ImageRef) -> None:
        if ref.record_id not in self._prefetched:
            self._prefetched[ref.record_id] = self.pool.submit(self._tiles_or_error, ref)

    def forget(self, record_id: int) -> None:
        """Drop an image's prefetched tiles: no batch will take it (its requests were aborted)."""
        fut = self._prefetched.pop(record_id, None)
        if fut is not None:
            fut.cancel()

    def process(self, refs: list[ImageRef]) -> BatchResult:
        res = BatchResult()
        t0 = time.perf_counter()
        futures = [self._prefetched.pop(r.record_id, None) or self.pool.submit(self._tiles_or_error, r)
                   for r in refs]
        tiles, ok = [], []
        for ref, fut in zip(refs, futures):
            out = fut.result()
            if isinstance(out, tuple):
                res.failed.append((ref.record_id, *out))
            else:
                tiles.append(out)
                ok.append(ref)
        t1 = time.perf_counter()
        res.preprocess_s = t1 - t0
        if not ok:
            return res
        batch = torch.cat(tiles)
        res.tiles = batch.shape[0]
        feats = self.encode(batch)
        feats = feats.reshape(-1, feats.shape[-1]).cpu()  # one device→host copy for the whole batch
        res.encode_s = time.perf_counter() - t1
        start = 0
        for ref in ok:
            rows = feats[start:start + ref.n_tokens]
            start += ref.n_tokens
            if _write(ref, rows):
                res.done.append(ref.record_id)
            else:
                res.failed.append((ref.record_id, "error", "its cache record was evicted before the embedding "
                                                           "was written"))
        return res

    def _tiles_or_error(self, ref: ImageRef) -> torch.Tensor | tuple[str, str]:
        try:
            return self._tiles(ref)
        except ImageError as e:  # the bytes are not a decodable image: the client's error
            return ("invalid", e.detail)
        except (FileNotFoundError, ValueError) as e:
            return ("error", str(e))
        except Exception as e:  # never lose the batch's other images
            return ("error", f"{type(e).__name__}: {e}")

    def _tiles(self, ref: ImageRef) -> torch.Tensor:
        seg = shm.attach(ref.img_name)
        try:
            data = bytes(seg.buf[:ref.img_bytes])
        finally:
            seg.close()
        # uint8 tiles: the encoder normalises them on its device
        tiles = tile_pixels(load_image(data), max_num=ref.max_patch, min_num=self.min_patch,
                            use_thumbnail=self.use_thumbnail)
        expected = ref.n_tokens // self.tokens_per_tile
        if tiles.shape[0] != expected:
            raise ValueError(f"image gave {tiles.shape[0]} tiles, the prompt reserved {expected}")
        return tiles


def _write(ref: ImageRef, rows: torch.Tensor) -> bool:
    try:
        seg = shm.attach(ref.emb_name)
    except FileNotFoundError:
        return False
    try:
        shm.tensor_view(seg, tuple(rows.shape), rows.dtype).copy_(rows)
    finally:
        seg.close()
    return True


# ---------------------------------------------------------------------------------------
# Workers as the visual server sees them


class LocalWorker:
    """The group leader lives in the visual server's process, on background threads.

    Two batches may be in flight, so one batch's decoding and tiling (CPU) overlaps the
    previous batch's forward (GPU). A finished batch wakes the server's loop through `conn`.
    """

    def __init__(self, runner: VitRunner, depth: int = 2):
        self.runner = runner
        self.depth = depth
        self.inflight = 0
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="vit-batch")
        self._results: queue.SimpleQueue[BatchResult] = queue.SimpleQueue()
        self.conn, self._wake = Pipe(duplex=False)

    @property
    def busy(self) -> bool:
        return self.inflight >= self.depth

    def prefetch(self, ref: ImageRef) -> None:
        self.runner.prefetch(ref)

    def forget(self, record_id: int) -> None:
        self.runner.forget(record_id)

    def dispatch(self, refs: list[ImageRef]) -> None:
        self.inflight += 1
        self._pool.submit(self._run, refs)

    def _run(self, refs: list[ImageRef]) -> None:
        try:
            result = self.runner.process(refs)
        except Exception as e:  # e.g. out of memory: fail these images, keep serving
            result = BatchResult(failed=[(r.record_id, "error", f"the vision encoder failed: {type(e).__name__}: {e}")
                                         for r in refs])
        self._results.put(result)
        self._wake.send_bytes(b"1")

    def poll(self) -> BatchResult | None:
        if not self.conn.poll():
            return None
        self.conn.recv_bytes()
        self.inflight -= 1
        return self._results.get()


class RemoteWorker:
    """A group leader in its own process, fed over a pipe."""

    def __init__(self, to_worker: Connection, from_worker: Connection):
        self.to_worker = to_worker
        self.conn = from_worker
        self.busy = False

    def prefetch(self, ref: ImageRef) -> None:
        """Nothing to do ahead: the worker's process prepares a batch's images when it arrives."""

    def forget(self, record_id: int) -> None:
        """Nothing was prepared ahead (see prefetch)."""

    def dispatch(self, refs: list[ImageRef]) -> None:
        self.busy = True
        self.to_worker.send(refs)

    def poll(self) -> BatchResult | None:
        if not self.conn.poll():
            return None
        self.busy = False
        return self.conn.recv()


# ---------------------------------------------------------------------------------------
# Tensor parallelism inside a group: the leader broadcasts each tile batch.


def tp_encode(encoder, tp) -> Callable[[torch.Tensor], torch.Tensor]:
    """Leader-side encode: send the tiles to the followers, then run our shard."""

    def encode(tiles: torch.Tensor) -> torch.Tensor:
        tiles = encoder.prepare(tiles)
        tp.broadcast(torch.tensor([tiles.shape[0]], dtype=torch.int64, device=encoder.device))
        tp.broadcast(tiles.contiguous())
        return encoder.encode(tiles)

    return encode


def tp_follow(encoder, tp, image_size: int) -> None:
    """Follower: encode whatever the leader broadcasts until it sends -1."""
    while True:
        n = int(tp.broadcast(torch.empty(1, dtype=torch.int64, device=encoder.device)).item())
        if n < 0:
            return
        tiles = tp.broadcast(torch.empty((n, 3, image_size, image_size), dtype=encoder.dtype, device=encoder.device))
        encoder.encode(tiles)
