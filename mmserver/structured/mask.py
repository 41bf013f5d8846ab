"""Applying grammar masks to the logits rows that have a grammar, with one reused bitmask.

The bitmask is filled on the host (xgrammar's matchers run on the CPU), then applied where the
logits are: in place on CPU, or copied once to a device buffer and applied by xgrammar's GPU
kernel. Buffers grow to the largest batch seen and are reused, so a step allocates nothing.
Batches without grammar rows never reach this module.
"""

from __future__ import annotations

from typing import Sequence

import torch
import xgrammar as xgr
from torch import Tensor

from .state import GrammarState

__all__ = ["TokenBitmask"]


class TokenBitmask:
    """A sampler's bitmask buffers; ``apply`` masks the grammar rows of a ``[B, V]`` logits."""

    def __init__(self) -> None:
        self._host: Tensor | None = None  # [rows, ceil(V / 32)] int32 on the CPU
        self._device: Tensor | None = None  # the same shape on the logits' device (non-CPU only)
        self._vocab = 0

    def apply(self, logits: Tensor, states: Sequence[GrammarState | None]) -> None:
        """Set ``logits[i, t] = -inf`` for every token ``t`` that row ``i``'s grammar forbids now,
        for the rows whose state is not None; the other rows are not touched."""
        batch, vocab = logits.shape
        if len(states) != batch:
            raise ValueError(f"{len(states)} grammar states for {batch} logits rows")
        host = self._host_buffer(batch, vocab)
        rows = [i for i, s in enumerate(states) if s is not None and s.fill_mask(host, i)]
        if not rows:
            return
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits, host[:batch], indices=rows)
            return
        device = self._device_buffer(logits.device)[:batch]
        # Pinned staging keeps the copy asynchronous (torch holds the block until it has run).
        device.copy_(host[:batch].pin_memory(), non_blocking=True)
        index = torch.tensor(rows, dtype=torch.int32).pin_memory().to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, device, indices=index)

    def _host_buffer(self, batch: int, vocab: int) -> Tensor:
        if self._host is None or self._vocab != vocab or self._host.shape[0] < batch:
            self._host = xgr.allocate_token_bitmask(batch, vocab)
            self._device = None
            self._vocab = vocab
        return self._host

    def _device_buffer(self, device: torch.device) -> Tensor:
        if self._device is None or self._device.device != device:
            self._device = torch.empty_like(self._host, device=device)
        return self._device
