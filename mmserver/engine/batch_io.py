"""A batch's integer inputs on their way to the device: one pinned host buffer, one copy.

Every forward (prefill, decode, mixed, CUDA-graph padded) takes its integer inputs from a
`HostBatch` that `InputBuffers.pack` writes into one pinned host buffer and copies to the
device with a single non-blocking copy; the `ForwardBatch` fields are typed views of that
device buffer. Separate copies per field would cost a launch each, and a pageable copy would
wait for the work queued before it (undoing the overlap schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..models.llm.decoder import ForwardBatch

ALIGN = 16  # bytes; every field starts 16-byte aligned, as triton specializes on pointer alignment

# (field, dtype) in packing order; the dtypes are ForwardBatch's.
_FIELDS: tuple[tuple[str, np.dtype], ...] = (
    ("input_ids", np.dtype(np.int64)), ("rope_positions", np.dtype(np.int64)), ("table_index", np.dtype(np.int64)),
    ("logit_rows", np.dtype(np.int64)), ("slots", np.dtype(np.int32)), ("req_rows", np.dtype(np.int32)),
    ("cu_q", np.dtype(np.int32)), ("prefix_lens", np.dtype(np.int32)), ("seq_lens", np.dtype(np.int32)),
    ("image_index", np.dtype(np.int32)), ("table_prefix_index", np.dtype(np.int64)),
    ("table_prefix_slots", np.dtype(np.int32)),
)
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


@dataclass
class HostBatch:
    """A batch's integer fields on the host (lists or int arrays), before packing.

    `table_index[t]` is `row * table_width + position` of token t, position being its index in
    its request's sequence: the token table is written with one scatter from it. Its RoPE
    position is `rope_positions[:, t]` (the same number unless the model family says otherwise)."""

    input_ids: Sequence[int]  # [T]
    rope_positions: Sequence[int] | np.ndarray  # [T], or [P, T] as an array
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
    # [E] each: token-table cells of cached prefixes that rows admitted since the last batch
    # start with (`TokenTable.record_prefix`), written with the new tokens' cells
    table_prefix_index: Sequence[int] | None = None
    table_prefix_slots: Sequence[int] | None = None

    @property
    def num_requests(self) -> int:
        return len(self.req_rows)

    @property
    def rope_rows(self) -> int:
        """P: rows of RoPE positions."""
        r = self.rope_positions
        return r.shape[0] if isinstance(r, np.ndarray) and r.ndim == 2 else 1


def _count(values: Sequence[int] | np.ndarray) -> int:
    return values.size if isinstance(values, np.ndarray) else len(values)


def _flat(values: Sequence[int] | np.ndarray) -> Sequence[int] | np.ndarray:
    return values.reshape(-1) if isinstance(values, np.ndarray) else values


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


def batch_bytes(tokens: int, requests: int, logit_rows: int, images: bool = True, rope_rows: int = 1) -> int:
    """Bytes `InputBuffers.pack` needs for a batch of this shape."""
    lengths = {"input_ids": tokens, "rope_positions": rope_rows * tokens, "table_index": tokens, "slots": tokens,
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

    def pack(self, hb: HostBatch, image_rows: torch.Tensor | None = None) -> ForwardBatch:
        """The ForwardBatch on the device, its integer fields views of the device buffer."""
        lengths = {name: _count(v) for name, _ in _FIELDS if (v := getattr(hb, name)) is not None}
        fields, nbytes = layout(lengths)
        if nbytes > self.capacity:
            if not self.growable:
                raise ValueError(f"batch needs {nbytes} bytes of static inputs, {self.capacity} reserved")
            self._alloc(max(nbytes, 2 * self.capacity))  # the old host buffer stays alive until its copy ends
        elif self._copied is not None:
            self._copied.synchronize()
        for name, dtype, off, n in fields:
            self._host_np[off:off + n * dtype.itemsize].view(dtype)[:] = _flat(getattr(hb, name))
        self.dev[:nbytes].copy_(self.host[:nbytes], non_blocking=self._cuda)
        if self._copied is not None:
            self._copied.record()
        v = {name: self.dev[off:off + n * dtype.itemsize].view(_TORCH_DTYPES[dtype]) for name, dtype, off, n in fields}
        return ForwardBatch(input_ids=v["input_ids"], rope_positions=v["rope_positions"].view(hb.rope_rows, -1),
                            table_index=v["table_index"], slots=v["slots"], req_rows=v["req_rows"], cu_q=v["cu_q"],
                            prefix_lens=v["prefix_lens"], seq_lens=v["seq_lens"], max_q_len=hb.max_q_len,
                            max_seq_len=hb.max_seq_len, logit_rows=v["logit_rows"], image_rows=image_rows,
                            image_index=v.get("image_index"), table_prefix_index=v.get("table_prefix_index"),
                            table_prefix_slots=v.get("table_prefix_slots"))
