"""Scatter new tokens' K and V into their KV-pool slots; one program per token."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_last_dim_contiguous, next_pow2


@triton.jit
def _write_kv_kernel(
    kv_ptr, k_ptr, v_ptr, slots_ptr,
    stride_kv_s, stride_kv_h, stride_kt, stride_kh, stride_vt, stride_vh,
    HK, D,
    BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_HK)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < HK) & (dims < D)
    dst = kv_ptr + slot * stride_kv_s + heads * stride_kv_h + dims
    k = tl.load(k_ptr + t * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HK * stride_kv_h, v.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    T, HK, D = k.shape
    if T == 0:
        return
    check_last_dim_contiguous(kv, k, v)
    block_hk, block_d = next_pow2(HK), next_pow2(D)
    _write_kv_kernel[(T,)](
        kv, k, v, slots,
        kv.stride(0), kv.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HK, D,
        BLOCK_HK=block_hk, BLOCK_D=block_d, num_warps=4 if block_hk * block_d >= 1024 else 2,
    )
