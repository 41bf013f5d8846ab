"""Small helpers shared by the triton kernel launchers."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when triton runs in its CPU interpreter (tests): launchers then pick small blocks."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots would default to tf32 on tensor cores; keep fp32 models exact."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_warps(block: int) -> int:
    """num_warps for a one-row-per-program elementwise/reduction kernel of `block` elements."""
    if block <= 512:
        return 2
    if block <= 2048:
        return 4
    if block <= 8192:
        return 8
    return 16


def check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"kernel needs a unit-stride last dim, got strides {t.stride()}")
