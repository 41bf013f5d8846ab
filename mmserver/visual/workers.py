"""Where the ViT runs: `visual_dp` groups of `visual_tp` ranks.

A group leader takes a batch of image records, preprocesses them (the model family's
`preprocess`), runs the encoder on the list of inputs (its tensor-parallel followers run the
same inputs, sent by broadcast) and writes each image's embedding into its shared-memory
segment. Inputs may differ in shape: they are batched as a list, never stacked here. With one group of one rank the leader is a plain
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
from typing import Callable, Sequence

import torch

from ..embed_cache import shm
from ..ipc import ImageRef
from ..models.errors import ImageError
from ..models.family import ModelFamily, VisionInput

Encode = Callable[[Sequence[VisionInput]], list[torch.Tensor]]


@dataclass
class BatchResult:
    done: list[int] = field(default_factory=list)  # record ids whose embedding is written
    # (record id, "invalid" (the client's image is bad: a 400) or "error", message without an image index)
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    tiles: int = 0  # encoder input units (first dim of the inputs: InternVL's tiles)
    preprocess_s: float = 0.0
    encode_s: float = 0.0


def default_preprocess_threads() -> int:
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class VitRunner:
    """Preprocess → encode → write, for one group leader.

    `prefetch` starts an image's decoding and tiling as soon as it arrives, before it is
    batched; `process` uses that work (or does it then) and runs the batch's forward."""

    def __init__(self, encode: Encode, family: ModelFamily, preprocess_threads: int | None = None):
        self.encode = encode
        self.family = family
        # PIL decodes and resizes without the GIL: images are prepared in parallel.
        self.pool = ThreadPoolExecutor(max_workers=preprocess_threads or default_preprocess_threads(),
                                       thread_name_prefix="vit-preprocess")
        self._prefetched: dict[int, Future] = {}  # record id → its input (or failure), being prepared

    def prefetch(self, ref: ImageRef) -> None:
        if ref.record_id not in self._prefetched:
            self._prefetched[ref.record_id] = self.pool.submit(self._input_or_error, ref)

    def forget(self, record_id: int) -> None:
        """Drop an image's prefetched tiles: no batch will take it (its requests were aborted)."""
        fut = self._prefetched.pop(record_id, None)
        if fut is not None:
            fut.cancel()

    def process(self, refs: list[ImageRef]) -> BatchResult:
        res = BatchResult()
        t0 = time.perf_counter()
        futures = [self._prefetched.pop(r.record_id, None) or self.pool.submit(self._input_or_error, r)
                   for r in refs]
        inputs, ok = [], []
        for ref, fut in zip(refs, futures):
            out = fut.result()
            if isinstance(out, tuple):
                res.failed.append((ref.record_id, *out))
            else:
                inputs.append(out)
                ok.append(ref)
        t1 = time.perf_counter()
        res.preprocess_s = t1 - t0
        if not ok:
            return res
        res.tiles = sum(x.pixels.shape[0] for x in inputs)
        feats = self.encode(inputs)
        # one device→host copy for the whole batch
        host = (torch.cat(feats) if len(feats) > 1 else feats[0]).cpu().split([f.shape[0] for f in feats])
        res.encode_s = time.perf_counter() - t1
        for ref, rows in zip(ok, host):
            if _write(ref, rows):
                res.done.append(ref.record_id)
            else:
                res.failed.append((ref.record_id, "error", "its cache record was evicted before the embedding "
                                                           "was written"))
        return res

    def _input_or_error(self, ref: ImageRef) -> VisionInput | tuple[str, str]:
        try:
            return self._input(ref)
        except ImageError as e:  # the bytes are not a decodable image: the client's error
            return ("invalid", e.detail)
        except (FileNotFoundError, ValueError) as e:
            return ("error", str(e))
        except Exception as e:  # never lose the batch's other images
            return ("error", f"{type(e).__name__}: {e}")

    def _input(self, ref: ImageRef) -> VisionInput:
        seg = shm.attach(ref.img_name)
        try:
            data = bytes(seg.buf[:ref.img_bytes])
        finally:
            seg.close()
        x = self.family.preprocess_media(data, ref.options)
        if x.n_tokens and x.n_tokens != ref.n_tokens:  # the header and the decoded image disagree
            raise ValueError(f"image gives {x.n_tokens} tokens, the prompt reserved {ref.n_tokens}")
        return x


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
# Tensor parallelism inside a group: the leader broadcasts each batch's inputs.
#
# Per batch: a header [n] (-1 stops the follower), one int64 row per input (dtype code,
# ndim, shape, grid length, grid), then every input's pixels flattened into one buffer.
# Inputs travel as the family made them (compact, e.g. uint8); each rank finishes them alike.

_MAX_DIMS, _MAX_GRID = 4, 4
_ROW = 2 + _MAX_DIMS + 1 + _MAX_GRID
_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.int64)


def _pack_meta(inputs: Sequence[VisionInput]) -> torch.Tensor:
    meta = torch.zeros((len(inputs), _ROW), dtype=torch.int64)
    for i, x in enumerate(inputs):
        shape, grid = tuple(x.pixels.shape), tuple(x.grid)
        if len(shape) > _MAX_DIMS or len(grid) > _MAX_GRID:
            raise ValueError(f"vision input of shape {shape} / grid {grid} exceeds the tp header")
        meta[i, 0] = _DTYPES.index(x.pixels.dtype)
        meta[i, 1] = len(shape)
        meta[i, 2:2 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
        meta[i, 2 + _MAX_DIMS] = len(grid)
        if grid:
            meta[i, 3 + _MAX_DIMS:3 + _MAX_DIMS + len(grid)] = torch.tensor(grid, dtype=torch.int64)
    return meta


def _unpack_meta(meta: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...]]]:
    out = []
    for row in meta.tolist():
        nd, ng = row[1], row[2 + _MAX_DIMS]
        out.append((_DTYPES[row[0]], tuple(row[2:2 + nd]), tuple(row[3 + _MAX_DIMS:3 + _MAX_DIMS + ng])))
    return out


def broadcast_inputs(tp, inputs: Sequence[VisionInput], device: torch.device) -> None:
    """Leader: send a batch's inputs (all of one dtype) to the group's followers."""
    if len({x.pixels.dtype for x in inputs}) > 1:
        raise ValueError("a batch's vision inputs must share one dtype")
    tp.broadcast(torch.tensor([len(inputs)], dtype=torch.int64, device=device))
    tp.broadcast(_pack_meta(inputs).to(device))
    tp.broadcast(torch.cat([x.pixels.reshape(-1) for x in inputs]).to(device).contiguous())


def receive_inputs(tp, device: torch.device) -> list[VisionInput] | None:
    """Follower: the leader's next batch of inputs, or None when it sends -1."""
    n = int(tp.broadcast(torch.empty(1, dtype=torch.int64, device=device)).item())
    if n < 0:
        return None
    metas = _unpack_meta(tp.broadcast(torch.empty((n, _ROW), dtype=torch.int64, device=device)).cpu())
    total = sum(torch.Size(shape).numel() for _, shape, _ in metas)
    flat = tp.broadcast(torch.empty(total, dtype=metas[0][0], device=device))
    inputs, start = [], 0
    for _, shape, grid in metas:
        size = torch.Size(shape).numel()
        inputs.append(VisionInput(flat[start:start + size].view(shape), grid=grid))
        start += size
    return inputs


def tp_encode(encoder, tp) -> Encode:
    """Leader-side encode: send the inputs to the followers, then run our shard."""

    def encode(inputs: Sequence[VisionInput]) -> list[torch.Tensor]:
        broadcast_inputs(tp, inputs, encoder.device)
        return encoder.encode_images(inputs)

    return encode


def tp_follow(encoder, tp) -> None:
    """Follower: encode whatever the leader broadcasts until it stops."""
    while (inputs := receive_inputs(tp, encoder.device)) is not None:
        encoder.encode_images(inputs)
