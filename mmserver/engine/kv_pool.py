"""Token-level KV memory: one buffer of slots, a free list, and the token table.

A slot holds one token's K and V for every layer. Requests own slots one token at a time,
so nothing is wasted on padding or block tails; the token table maps (request row,
position) → slot for the attention kernels.

Both structures hold one reserved extra entry past their capacity: the scratch slot
(`KVPool.scratch_slot`) and the scratch row (`TokenTable.scratch_row`). CUDA-graph padding rows
write their K/V to the scratch slot and point at the scratch row, so they never touch what a
request owns. Neither is ever handed out, and neither counts in `num_slots` / `free` / `used` or
`max_requests` / `free_rows`: the reported capacity is what requests can use. A TP follower that
builds its pool and table with these classes gets the same reserved entries as rank 0.
"""

from __future__ import annotations

import numpy as np
import torch


class KVPoolExhausted(RuntimeError):
    """Raised when a caller asks for more slots than are free (admission should prevent it)."""


class KVPool:
    """`kv_shape` = (layers, num_slots, 2 * kv_heads, head_dim); the buffer has num_slots + 1 slots,
    the last being the scratch slot."""

    def __init__(self, kv_shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str):
        layers, num_slots, heads2, head_dim = kv_shape
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self.buffer = torch.zeros((layers, num_slots + 1, heads2, head_dim), dtype=dtype, device=device)
        # Free slots as a stack on the host: allocation is a slice, no device sync.
        self._free = torch.arange(num_slots, dtype=torch.int32)
        self._top = num_slots

    @property
    def free(self) -> int:
        return self._top

    @property
    def used(self) -> int:
        return self.num_slots - self._top

    def alloc(self, n: int) -> torch.Tensor:
        """`n` free slots as an int32 host tensor."""
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
    """[max_requests + 1, max_len] slot ids on the device (the last row is the scratch row), plus a
    host mirror of each row's slots so that freeing a row needs nothing from the device."""

    def __init__(self, max_requests: int, max_len: int, device: torch.device | str):
        self.max_requests = max_requests
        self.max_len = max_len
        self.scratch_row = max_requests
        self.table = torch.zeros((max_requests + 1, max_len), dtype=torch.int32, device=device)
        self._host = np.zeros((max_requests, max_len), dtype=np.int32)  # calloc: pages touched on use only
        self._lens = [0] * max_requests
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self._owned: set[int] = set()

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

    def flat_index(self, row: int, position: int) -> int:
        """Index of (row, position) in `table.view(-1)`, for `write`."""
        return row * self.max_len + position

    def record(self, row: int, start: int, slots: np.ndarray | torch.Tensor) -> None:
        """Host side only: positions start..start+n of `row` live in `slots` (appended in order).
        The device table is written by `write`, batched over a step."""
        n = len(slots)
        if start + n > self.max_len:
            raise KVPoolExhausted(f"request longer than the token table's {self.max_len} positions")
        if row not in self._owned or start != self._lens[row]:
            raise RuntimeError(f"row {row}: positions must be appended in order to an allocated row")
        self._host[row, start:start + n] = np.asarray(slots)
        self._lens[row] = start + n

    def write(self, flat_index: torch.Tensor, slots: torch.Tensor) -> None:
        """table.view(-1)[flat_index] = slots: one scatter for a whole batch (device tensors)."""
        self.table.view(-1).index_copy_(0, flat_index, slots)

    def append(self, row: int, start: int, slots: torch.Tensor) -> None:
        """`record` plus the device write for one row (the engine batches writes with `write`)."""
        self.record(row, start, slots)
        self.table[row, start:start + len(slots)] = slots.to(self.table.device, non_blocking=True)

    def held(self, row: int) -> torch.Tensor:
        """The slots `row` holds, in position order (host int32)."""
        return torch.from_numpy(self._host[row, :self._lens[row]].copy())

    def free_row(self, row: int) -> torch.Tensor:
        """Give the row back; returns the slots it held so the caller can release them."""
        if row not in self._owned:
            raise RuntimeError(f"row {row} is not allocated")
        held = self.held(row)
        self._owned.discard(row)
        self._lens[row] = 0
        self._free_rows.append(row)
        return held
