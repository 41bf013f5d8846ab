"""POSIX shared-memory segments that this server owns explicitly.

Python's resource tracker would unlink a segment when *any* process that attached to it
exits, and warn about "leaks" it does not understand; we unregister every segment from it
and unlink ourselves: the cache unlinks on eviction, the launcher sweeps the server's
prefix at shutdown.
"""

from __future__ import annotations

import os
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")


def _untrack(shm: shared_memory.SharedMemory) -> None:
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass


def create(name: str, size: int) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name, create=True, size=max(size, 1))
    _untrack(shm)
    return shm


def attach(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name, create=False)
    _untrack(shm)
    return shm


def unlink(name: str) -> None:
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass


def sweep(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with `prefix`; returns what it removed."""
    removed = []
    if SHM_DIR.is_dir():
        for p in SHM_DIR.iterdir():
            if p.name.startswith(prefix):
                unlink(p.name)
                removed.append(p.name)
    return removed


def tensor_view(shm: shared_memory.SharedMemory, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor over the segment's bytes (no copy)."""
    n = 1
    for s in shape:
        n *= s
    return torch.frombuffer(shm.buf, dtype=dtype, count=n).view(shape)
