"""Token-level KV memory: one buffer of slots, a free list, and the token table.

A slot holds one token's K and V for every layer. Requests own slots one token at a time,
so nothing is wasted on padding or block tails; the token table maps (request row,
position) → slot for the attention kernels.

CUDA-graph padding rows (see `cuda_graphs`) need a KV slot and a token-table cell that no request
uses. Rank 0 broadcasts padded batches to tensor-parallel followers, which write them too, so
both live in what every rank allocates through `allocate_kv` (`DecoderLM.kv_shape(N)`,
`[max_requests, max_len]`):

* the scratch slot is the buffer's last slot: `kv_shape(N)` has N + 1 slots and `KVPool` never
  hands out or counts the last one (`num_slots`, `free`, `used` cover the N usable slots);
* the pad cell is the last position of a row (`TokenTable.pad_row`, `pad_position`). No request
  reads or writes it: a request holds at most max_len tokens and never feeds its last token
  back, so its positions stop at max_len - 2. `record` enforces this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from ..models.llm.decoder import DecoderLM
    from .config import EngineConfig
    from .prefix_cache import PrefixCache

Index = TypeVar("Index", int, np.ndarray)


class KVPoolExhausted(RuntimeError):
    """Raised when a caller asks for more slots than are free (admission should prevent it)."""


class KVPool:
    """`kv_shape` = (layers, N + 1, 2 * kv_heads, head_dim), as `DecoderLM.kv_shape(N)` gives: N usable
    slots and, last, the scratch slot."""

    def __init__(self, kv_shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str):
        total = kv_shape[1]
        if total < 2:
            raise ValueError(f"the KV pool needs at least 2 slots (one is reserved as scratch), got {total}")
        self.num_slots = total - 1
        self.scratch_slot = total - 1
        self.buffer = torch.zeros(kv_shape, dtype=dtype, device=device)
        # Free slots as a stack on the host: allocation is a slice, no device sync.
        self._free = torch.arange(self.num_slots, dtype=torch.int32)
        self._top = self.num_slots
        # The prefix cache, if any: the slots it holds are `cached`, neither used nor free, and
        # `alloc` evicts its unlocked ones when the free stack is short.
        self.cache: PrefixCache | None = None

    @property
    def free(self) -> int:
        return self._top

    @property
    def cached(self) -> int:
        """Slots the prefix cache holds (used + free + cached = num_slots)."""
        return self.cache.size if self.cache is not None else 0

    @property
    def used(self) -> int:
        """Slots running requests hold on their own (not the cached prefixes they share)."""
        return self.num_slots - self._top - self.cached

    @property
    def available(self) -> int:
        """Free slots plus the cached ones nobody uses (evicted on demand)."""
        return self._top + (self.cache.evictable if self.cache is not None else 0)

    def alloc(self, n: int) -> torch.Tensor:
        """`n` free slots as an int32 host tensor, evicting unlocked cached prefixes if needed."""
        if n > self._top and self.cache is not None:
            self.release(torch.from_numpy(self.cache.evict(n - self._top)))
        if n > self._top:
            raise KVPoolExhausted(f"asked for {n} KV slots, {self._top} free")
        self._top -= n
        return self._free[self._top:self._top + n].clone()

    def release(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if self._top + n > self.num_slots:
            raise RuntimeError("KV slots released twice")
        slots = slots.to(torch.int32).cpu()
        if n and not 0 <= int(slots.min()) <= int(slots.max()) < self.num_slots:
            raise RuntimeError("released a slot outside the pool (the scratch slot is never owned)")
        self._free[self._top:self._top + n] = slots
        self._top += n


class TokenTable:
    """[max_requests, max_len] slot ids on the device, plus a host mirror of each row's slots so
    that freeing a row needs nothing from the device. (pad_row, pad_position) is the pad cell."""

    def __init__(self, max_requests: int, max_len: int, device: torch.device | str):
        self.max_requests = max_requests
        self.max_len = max_len
        self.pad_row, self.pad_position = 0, max_len - 1
        self.table = torch.zeros((max_requests, max_len), dtype=torch.int32, device=device)
        self._host = np.zeros((max_requests, max_len), dtype=np.int32)  # calloc: pages touched on use only
        self._lens = np.zeros(max_requests, dtype=np.int64)  # positions recorded per row
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self._owned: set[int] = set()
        # Cells recorded on the host by `record_prefix` and not yet on the device: (flat index,
        # slot) arrays, written with the next batch's cells (`take_prefix_writes`).
        self._prefix_writes: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # by row

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int:
        if not self._free_rows:
            raise KVPoolExhausted("no free request row in the token table")
        row = self._free_rows.pop()
        self._lens[row] = 0
        self._owned.add(row)
        return row

    def flat_index(self, row: Index, position: Index) -> Index:
        """Index of (row, position) in `table.view(-1)`, for `write`."""
        return row * self.max_len + position

    def record(self, row: int, start: int, slots: np.ndarray | torch.Tensor) -> None:
        """Host side only: positions start..start+n of `row` live in `slots` (appended in order).
        The device table is written by `write`, batched over a step."""
        self.record_step([row], [start], [len(slots)], np.asarray(slots))

    def record_step(self, rows: Sequence[int], starts: Sequence[int], counts: Sequence[int],
                    slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`record` for a whole step: row rows[i] appends counts[i] positions from starts[i] on,
        whose slots lie packed in `slots` in row order. Returns each token's position and its
        `flat_index`, from which `write` fills the device table in one scatter."""
        rows_a, starts_a = np.asarray(rows, dtype=np.int64), np.asarray(starts, dtype=np.int64)
        counts_a = np.asarray(counts, dtype=np.int64)
        ends = starts_a + counts_a
        if len(rows) and ends.max() > self.pad_position:  # a request never feeds its last token back
            raise KVPoolExhausted(f"request longer than the token table's {self.max_len} positions")
        if not (self._owned.issuperset(rows) and np.array_equal(self._lens[rows_a], starts_a)):
            raise RuntimeError("a row's positions must be appended in order to an allocated row")
        token_rows = np.repeat(rows_a, counts_a)
        first = np.cumsum(counts_a) - counts_a  # each row's first token in `slots`
        positions = np.arange(len(token_rows)) + np.repeat(starts_a - first, counts_a)
        self._host[token_rows, positions] = slots
        self._lens[rows_a] = ends
        return positions, self.flat_index(token_rows, positions)

    def record_prefix(self, row: int, slots: np.ndarray) -> None:
        """A new row starts with a cached prefix: positions 0..n-1 live in `slots`. The host
        mirror is written now, the device table with the next batch (every rank's, through
        the batch: see `take_prefix_writes`)."""
        slots = np.asarray(slots, dtype=np.int32)
        if len(slots):
            self.record(row, 0, slots)
            self._prefix_writes[row] = (self.flat_index(row, np.arange(len(slots), dtype=np.int64)), slots)

    def take_prefix_writes(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The (flat index, slot) cells `record_prefix` left for the device, once; None if none."""
        if not self._prefix_writes:
            return None
        index, slots = (np.concatenate(parts) for parts in zip(*self._prefix_writes.values()))
        self._prefix_writes.clear()
        return index, slots

    def write(self, flat_index: torch.Tensor, slots: torch.Tensor) -> None:
        """table.view(-1)[flat_index] = slots: one scatter for a whole batch (device tensors)."""
        self.table.view(-1).index_copy_(0, flat_index, slots)

    def held(self, row: int) -> torch.Tensor:
        """The slots `row` holds, in position order (host int32)."""
        return torch.from_numpy(self._host[row, :int(self._lens[row])].copy())

    def free_row(self, row: int) -> torch.Tensor:
        """Give the row back; returns the slots it held so the caller can release them."""
        if row not in self._owned:
            raise RuntimeError(f"row {row} is not allocated")
        held = self.held(row)
        self._prefix_writes.pop(row, None)  # a row freed before its first batch: nothing to write
        self._owned.discard(row)
        self._lens[row] = 0
        self._free_rows.append(row)
        return held


def allocate_kv(llm: DecoderLM, config: EngineConfig) -> tuple[KVPool, TokenTable]:
    """One rank's KV pool and token table for `config`. Rank 0's engine and the tensor-parallel
    followers both allocate here, so every rank has the same slots, scratch slot and pad cell."""
    pool = KVPool(llm.kv_shape(config.max_total_tokens), llm.dtype, llm.device)
    return pool, TokenTable(config.max_requests, config.max_req_len, llm.device)
