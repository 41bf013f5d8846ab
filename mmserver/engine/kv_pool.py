"""Token-level KV memory: one buffer of slots, a free list, and the token table.

A slot holds one token's K and V for every layer. Requests own slots one token at a time,
so nothing is wasted on padding or block tails; the token table maps (request row,
position) → slot for the attention kernels.
"""

from __future__ import annotations

import torch


class KVPoolExhausted(RuntimeError):
    """Raised when a caller asks for more slots than are free (admission should prevent it)."""


class KVPool:
    def __init__(self, kv_shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str):
        layers, num_slots, heads2, head_dim = kv_shape
        self.num_slots = num_slots
        self.buffer = torch.zeros(kv_shape, dtype=dtype, device=device)
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
        if n > self._top:
            raise KVPoolExhausted(f"asked for {n} KV slots, {self._top} free")
        self._top -= n
        return self._free[self._top:self._top + n].clone()

    def release(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if self._top + n > self.num_slots:
            raise RuntimeError("KV slots released twice")
        self._free[self._top:self._top + n] = slots.to(torch.int32).cpu()
        self._top += n


class TokenTable:
    """[max_requests, max_len] slot ids on the device, plus a host mirror of each row's slots."""

    def __init__(self, max_requests: int, max_len: int, device: torch.device | str):
        self.max_requests = max_requests
        self.max_len = max_len
        self.table = torch.zeros((max_requests, max_len), dtype=torch.int32, device=device)
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self.slots: dict[int, list[torch.Tensor]] = {}

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int:
        if not self._free_rows:
            raise KVPoolExhausted("no free request row in the token table")
        row = self._free_rows.pop()
        self.slots[row] = []
        return row

    def append(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Record that positions start..start+n of `row` live in `slots`."""
        n = slots.numel()
        if start + n > self.max_len:
            raise KVPoolExhausted(f"request longer than the token table's {self.max_len} positions")
        self.table[row, start:start + n] = slots.to(self.table.device, non_blocking=True)
        self.slots[row].append(slots)

    def free_row(self, row: int) -> torch.Tensor:
        """Give the row back; returns the slots it held so the caller can release them."""
        held = self.slots.pop(row)
        self._free_rows.append(row)
        return torch.cat(held) if held else torch.empty(0, dtype=torch.int32)
