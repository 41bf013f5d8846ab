"""CUDA-graph replay of the decode forward: capture, padding, replay.

A 1B decoder's decode step is a few hundred tiny kernels (24 layers × ~12 launches): on a GPU
the launches and the Python around them cost far more than the math. `DecodeGraphs` captures
`DecoderLM.forward` of an all-decode batch once per padded batch size and replays it.

Inputs. Each captured size owns an `InputBuffers` (`batch_io`, which every batch goes
through), its *static inputs*: a decode batch of B requests is padded on the host to the size
S it replays with and packed straight into that buffer, so a graph step costs one copy, one
token-table write and one replay.

Padding. A pad row holds input id 0, `seq_len` 0 (the decode attention kernel returns zeros for
it), the KV pool's reserved scratch slot (its K/V write lands there, never in a request's slot),
the token table's pad cell as (row, position): a cell no request ever uses, so a follower's
token-table write of the pad row is harmless too (see `kv_pool`), and RoPE position 0 (any
position the cos/sin table holds would do: the pad row's K/V go to the scratch slot). Pad rows
also produce logits, which are dropped: only the first B rows are returned. Graphs capture
plain RoPE (one row of positions, P = 1); other batches run eagerly.

Fixed at capture: the tensors' addresses (static inputs, the KV pool, the token table), the
batch size, and `max_seq_len`, which sets the decode kernel's split count; replays use the
engine's `max_req_len` as capture did.

Tensor parallelism: with `announce` (the runner passes `TPLeader.announce`) the padded
batch is broadcast to the follower ranks before each replay. They run it eagerly with the same
S rows, so the all_reduces captured in rank 0's graph meet theirs with the same shapes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..models.llm.decoder import DecoderLM, ForwardBatch
from .batch_io import HostBatch, InputBuffers, batch_bytes
from .kv_pool import KVPool, TokenTable

DEFAULT_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
WARMUP_RUNS = 2  # eager runs per size before its capture: triton compiles, cuBLAS / NCCL set up

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


@dataclass(frozen=True)
class PadValues:
    """What a pad row holds: a KV slot and a token-table cell that no request uses (its RoPE position is 0)."""

    slot: int
    row: int
    table_index: int  # flat token-table index of the pad cell (row, the table's pad position)

    @classmethod
    def of(cls, kv: KVPool, table: TokenTable) -> PadValues:
        """The scratch slot and the pad cell that `kv_pool` reserves."""
        return cls(kv.scratch_slot, table.pad_row, table.flat_index(table.pad_row, table.pad_position))


def paddable(hb: HostBatch) -> bool:
    """A batch a decode graph can run: one token per request, every one producing logits, no images,
    plain RoPE."""
    return (hb.max_q_len <= 1 and len(hb.input_ids) == hb.num_requests == len(hb.logit_rows)
            and hb.image_index is None and hb.rope_rows == 1)


def _padded(values: Sequence[int] | np.ndarray, k: int, fill: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    return np.concatenate([values, np.full(k, fill, dtype=np.int64)])


def pad_decode(hb: HostBatch, size: int, pad: PadValues, max_seq_len: int) -> HostBatch:
    """`hb` (a `paddable` batch) padded to `size` rows."""
    b = hb.num_requests
    if not paddable(hb):
        raise ValueError("only all-decode batches without images, every row producing logits, with plain "
                         "RoPE can be padded")
    if size < b:
        raise ValueError(f"cannot pad {b} rows to {size}")
    k = size - b
    return HostBatch(
        input_ids=_padded(hb.input_ids, k, 0), rope_positions=_padded(hb.rope_positions, k, 0),
        table_index=_padded(hb.table_index, k, pad.table_index), slots=_padded(hb.slots, k, pad.slot),
        req_rows=_padded(hb.req_rows, k, pad.row), cu_q=np.arange(size + 1), prefix_lens=_padded(hb.prefix_lens, k, 0),
        seq_lens=_padded(hb.seq_lens, k, 0), logit_rows=np.arange(size), max_q_len=1, max_seq_len=max_seq_len)


class DecodeGraphs:
    """CUDA graphs of `model.forward` on all-decode batches, one per padded size.

    `capture()` once, then pack a padded host batch into `inputs(S)` and `replay` it (no
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
            self._static[size] = self._inputs[size].pack(self.pad_batch(empty, size))
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
