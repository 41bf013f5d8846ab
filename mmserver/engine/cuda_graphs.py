"""Batch inputs in one host→device copy, and CUDA-graph replay of the decode forward.

A 1B decoder's decode step is a few hundred tiny kernels (24 layers × ~12 launches): on a GPU
the launches and the Python around them cost far more than the math. `DecodeGraphs` captures
`DecoderLM.forward` of an all-decode batch once per padded batch size and replays it.

Inputs. `InputBuffers.pack` writes a batch's integer fields (`HostBatch`) into one pinned host
buffer and copies it to the device with a single non-blocking copy; the `ForwardBatch` fields
are typed views of that device buffer. The engine uses this for every batch. Each captured
size owns such a buffer (its *static inputs*): a decode batch of B requests is padded on the
host to the size P it replays with and packed straight into that buffer, so a graph step costs
one copy, one token-table write and one replay.

Padding. A pad row holds input id 0, `seq_len` 0 (the decode attention kernel returns zeros for
it), the KV pool's reserved scratch slot (its K/V write lands there, never in a request's slot)
and the token table's pad cell as (row, position): a cell no request ever uses, so a follower's
token-table write of the pad row is harmless too (see `kv_pool`). Pad rows also produce
logits, which are dropped: only the first B rows are returned.

Fixed at capture: the tensors' addresses (static inputs, the KV pool, the token table), the
batch size, and `max_seq_len`, which sets the decode kernel's split count; replays use the
engine's `max_req_len` as capture did.

Tensor parallelism: with `announce` (the engine passes `TPLeader`'s broadcast) the padded
batch is broadcast to the follower ranks before each replay. They run it eagerly with the same
P rows, so the all_reduces captured in rank 0's graph meet theirs with the same shapes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..models.llm.decoder import DecoderLM, ForwardBatch

DEFAULT_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
WARMUP_RUNS = 2  # eager runs per size before its capture: triton compiles, cuBLAS / NCCL set up
ALIGN = 16  # bytes; every field starts 16-byte aligned, as triton specializes on pointer alignment

# (field, dtype) in packing order; the dtypes are ForwardBatch's.
_FIELDS: tuple[tuple[str, np.dtype], ...] = (
    ("input_ids", np.dtype(np.int64)), ("positions", np.dtype(np.int64)), ("table_index", np.dtype(np.int64)),
    ("logit_rows", np.dtype(np.int64)), ("slots", np.dtype(np.int32)), ("req_rows", np.dtype(np.int32)),
    ("cu_q", np.dtype(np.int32)), ("prefix_lens", np.dtype(np.int32)), ("seq_lens", np.dtype(np.int32)),
    ("image_index", np.dtype(np.int32)),
)
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def graphs_enabled(cuda_graphs: bool, device: torch.device) -> bool:
    """Graphs only on CUDA, when the config asks for them (`EngineConfig` folds in MMSERVER_CUDA_GRAPHS)."""
    return cuda_graphs and device.type == "cuda"


def graph_sizes(max_requests: int, sizes: Sequence[int] = DEFAULT_SIZES) -> list[int]:
    """The sizes to capture: `sizes` below max_requests, plus max_requests itself when it is within
    their range, so every decode batch the engine can form has a graph. Larger batches run eagerly."""
    out = sorted({s for s in sizes if 0 < s < max_requests})
    if max_requests > 0 and (not out or max_requests <= max(sizes)):
        out.append(max_requests)
    return out


@dataclass
class HostBatch:
    """A batch's integer fields on the host (lists or int arrays), before packing.

    `table_index[t]` is `row * table_width + position` of token t: the engine writes the token
    table with one scatter from it."""

    input_ids: Sequence[int]  # [T]
    positions: Sequence[int]  # [T]
    table_index: Sequence[int]  # [T]
    slots: Sequence[int]  # [T]
    req_rows: Sequence[int]  # [B]
    cu_q: Sequence[int]  # [B + 1]
    prefix_lens: Sequence[int]  # [B]
    seq_lens: Sequence[int]  # [B]
    logit_rows: Sequence[int]  # [R]
    max_q_len: int
    max_seq_len: int
    image_index: Sequence[int] | None = None  # [T], only with image rows

    @property
    def num_requests(self) -> int:
        return len(self.req_rows)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def layout(lengths: dict[str, int]) -> tuple[list[tuple[str, np.dtype, int, int]], int]:
    """(field, dtype, byte offset, count) of each present field, and the bytes they need."""
    fields, offset = [], 0
    for name, dtype in _FIELDS:
        if name in lengths:
            fields.append((name, dtype, offset, lengths[name]))
            offset += _round_up(lengths[name] * dtype.itemsize, ALIGN)
    return fields, offset


def batch_bytes(tokens: int, requests: int, logit_rows: int, images: bool = True) -> int:
    """Bytes `InputBuffers.pack` needs for a batch of this shape."""
    lengths = {"input_ids": tokens, "positions": tokens, "table_index": tokens, "slots": tokens,
               "logit_rows": logit_rows, "req_rows": requests, "cu_q": requests + 1, "prefix_lens": requests,
               "seq_lens": requests}
    if images:
        lengths["image_index"] = tokens
    return layout(lengths)[1]


class InputBuffers:
    """A pinned host buffer and a device buffer: `pack` turns a `HostBatch` into a `ForwardBatch`
    with one host→device copy and no sync.

    The returned views alias the device buffer: they are valid until the next `pack`. Copies are
    stream-ordered before later kernels, and `pack` waits for the previous copy to have read the
    host buffer before overwriting it (a step without sampling does not sync the stream).
    With `growable=False` (graph static inputs) the buffers never move."""

    def __init__(self, device: torch.device | str, capacity: int, growable: bool = True):
        self.device = torch.device(device)
        self.growable = growable
        self._cuda = self.device.type == "cuda"
        self._copied = torch.cuda.Event() if self._cuda else None
        self._alloc(max(capacity, ALIGN))

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.host = torch.zeros(capacity, dtype=torch.uint8, pin_memory=self._cuda)
        self._host_np = self.host.numpy()
        self.dev = torch.zeros(capacity, dtype=torch.uint8, device=self.device)

    def pack(self, hb: HostBatch, image_rows: torch.Tensor | None = None) -> tuple[ForwardBatch, torch.Tensor]:
        """(the ForwardBatch, the table_index view) on the device."""
        lengths = {name: len(v) for name, _ in _FIELDS if (v := getattr(hb, name)) is not None}
        fields, nbytes = layout(lengths)
        if nbytes > self.capacity:
            if not self.growable:
                raise ValueError(f"batch needs {nbytes} bytes of static inputs, {self.capacity} reserved")
            self._alloc(max(nbytes, 2 * self.capacity))  # the old host buffer stays alive until its copy ends
        elif self._copied is not None:
            self._copied.synchronize()
        for name, dtype, off, n in fields:
            self._host_np[off:off + n * dtype.itemsize].view(dtype)[:] = getattr(hb, name)
        self.dev[:nbytes].copy_(self.host[:nbytes], non_blocking=self._cuda)
        if self._copied is not None:
            self._copied.record()
        v = {name: self.dev[off:off + n * dtype.itemsize].view(_TORCH_DTYPES[dtype]) for name, dtype, off, n in fields}
        batch = ForwardBatch(input_ids=v["input_ids"], positions=v["positions"], slots=v["slots"],
                             req_rows=v["req_rows"], cu_q=v["cu_q"], prefix_lens=v["prefix_lens"],
                             seq_lens=v["seq_lens"], max_q_len=hb.max_q_len, max_seq_len=hb.max_seq_len,
                             logit_rows=v["logit_rows"], image_rows=image_rows, image_index=v.get("image_index"))
        return batch, v["table_index"]


@dataclass(frozen=True)
class PadValues:
    """What a pad row holds: a KV slot and a token-table cell (row, position) that no request uses."""

    slot: int
    row: int
    position: int
    table_index: int  # flat token-table index of (row, position)


def pad_decode(hb: HostBatch, size: int, pad: PadValues, max_seq_len: int) -> HostBatch:
    """`hb` (an all-decode batch with every row producing logits) padded to `size` rows."""
    b = hb.num_requests
    if not (hb.max_q_len <= 1 and len(hb.input_ids) == b == len(hb.logit_rows) and hb.image_index is None):
        raise ValueError("only all-decode batches without images, every row producing logits, can be padded")
    if size < b:
        raise ValueError(f"cannot pad {b} rows to {size}")
    k = size - b
    return HostBatch(
        input_ids=list(hb.input_ids) + [0] * k, positions=list(hb.positions) + [pad.position] * k,
        table_index=list(hb.table_index) + [pad.table_index] * k,
        slots=np.concatenate([np.asarray(hb.slots, dtype=np.int32), np.full(k, pad.slot, dtype=np.int32)]),
        req_rows=list(hb.req_rows) + [pad.row] * k, cu_q=list(range(size + 1)),
        prefix_lens=list(hb.prefix_lens) + [0] * k, seq_lens=list(hb.seq_lens) + [0] * k,
        logit_rows=list(range(size)), max_q_len=1, max_seq_len=max_seq_len)


class DecodeGraphs:
    """CUDA graphs of `model.forward` on all-decode batches, one per padded size.

    `capture()` once, then pack a padded host batch into `inputs(P)` and `replay` it (no
    device-side copies). The logits returned alias the graph's output: use them before the
    next replay.
    `capture(emulate=True)` skips CUDA graphs and replays by running the static batch eagerly:
    the same padding, buffers and bookkeeping, testable on CPU.
    """

    def __init__(self, model: DecoderLM, kv_buffer: torch.Tensor, token_table: torch.Tensor, sizes: Sequence[int],
                 max_seq_len: int, pad: PadValues, announce: Callable[[ForwardBatch], object] | None = None):
        if not sizes:
            raise ValueError("no batch sizes to capture")
        self.model = model
        self.kv_buffer = kv_buffer
        self.token_table = token_table
        self.sizes = sorted(set(sizes))
        self.max_seq_len = max_seq_len
        self.pad = pad
        self.announce = announce
        self.device = kv_buffer.device
        self.replays = 0
        self.emulated = False
        self._inputs = {s: InputBuffers(self.device, batch_bytes(s, s, s, images=False), growable=False)
                        for s in self.sizes}
        self._static: dict[int, ForwardBatch] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def bucket(self, n: int) -> int | None:
        """The smallest captured size >= n, or None (run eagerly)."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if n > 0 and i < len(self.sizes) else None

    def inputs(self, size: int) -> InputBuffers:
        return self._inputs[size]

    def pad_batch(self, hb: HostBatch, size: int) -> HostBatch:
        return pad_decode(hb, size, self.pad, self.max_seq_len)

    @torch.inference_mode()
    def capture(self, emulate: bool = False) -> None:
        empty = HostBatch([], [], [], [], [], [0], [], [], [], max_q_len=1, max_seq_len=self.max_seq_len)
        for size in self.sizes:
            self._static[size], _ = self._inputs[size].pack(self.pad_batch(empty, size))
        self.emulated = emulate
        if emulate:
            return
        pool = torch.cuda.graph_pool_handle()  # one pool: only one graph runs at a time
        stream = torch.cuda.Stream(self.device)  # warm-up and capture on the same side stream (cuBLAS workspaces)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            for size in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
                batch = self._static[size]
                with torch.cuda.stream(stream):
                    for _ in range(WARMUP_RUNS):
                        self._eager(batch)
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads (e.g. NCCL's watchdog querying events) may not abort the capture
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    out = self.model.forward(batch, self.kv_buffer, self.token_table)
                self._graphs[size], self._outputs[size] = graph, out
        except BaseException:
            self._graphs.clear()
            self._outputs.clear()
            raise
        finally:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-ups' activations, cached for the side stream

    def _eager(self, batch: ForwardBatch) -> torch.Tensor:
        if self.announce is not None:
            self.announce(batch)
        return self.model.forward(batch, self.kv_buffer, self.token_table)

    @torch.inference_mode()
    def replay(self, size: int, batch: ForwardBatch, n: int) -> torch.Tensor:
        """Logits [n, vocab] of a batch already packed into `inputs(size)` (its first n rows real)."""
        static = self._static[size]
        if batch.input_ids.data_ptr() != static.input_ids.data_ptr() or batch.req_rows.numel() != size:
            raise ValueError(f"batch is not in the static inputs of size {size}: pack it with inputs({size})")
        self.replays += 1
        if self.emulated:
            return self._eager(static)[:n]
        if self.announce is not None:
            self.announce(static)
        self._graphs[size].replay()
        return self._outputs[size][:n]
