"""Fused rope + KV-pool write: `apply_rope` then `write_kv` in one launch (one program per token).

The decoder calls both once per layer, every step; fusing them halves those launches
(28 layers: 56 -> 28 per decode step on an 8B model) and never writes the rotated k back.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_last_dim_contiguous, next_pow2
from .rope import _rotate_heads


@triton.jit
def _rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, kv_ptr, pos_ptr, slots_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_kv_s, stride_kv_h, stride_cos,
    HQ, HK, HALF,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + pos * stride_cos + dims, mask=dims < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + dims, mask=dims < HALF, other=0.0)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, HQ, c, s, HALF, BLOCK_HQ, BLOCK_HALF)

    heads = tl.arange(0, BLOCK_HK)[:, None]
    mask = (heads < HK) & (dims[None, :] < HALF)
    k1_ptr = k_ptr + t * stride_kt + heads * stride_kh + dims[None, :]
    v1_ptr = v_ptr + t * stride_vt + heads * stride_vh + dims[None, :]
    dst = kv_ptr + slot * stride_kv_s + heads * stride_kv_h + dims[None, :]
    k1 = tl.load(k1_ptr, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    # round to k's dtype first, as apply_rope's in-place store does, then to the pool's
    k_ty, kv_ty = k_ptr.dtype.element_ty, kv_ptr.dtype.element_ty
    tl.store(dst, (k1 * c - k2 * s).to(k_ty).to(kv_ty), mask=mask)
    tl.store(dst + HALF, (k2 * c + k1 * s).to(k_ty).to(kv_ty), mask=mask)
    dst_v = dst + HK * stride_kv_h
    tl.store(dst_v, tl.load(v1_ptr, mask=mask).to(kv_ty), mask=mask)
    tl.store(dst_v + HALF, tl.load(v1_ptr + HALF, mask=mask).to(kv_ty), mask=mask)


def rope_and_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Rope q [T, Hq, D] in place; kv[slots[t], :Hk] = rope(k[t]), kv[slots[t], Hk:] = v[t].

    Same bits as `apply_rope(q, k, ...)` then `write_kv(kv, k, v, slots)`, except that k
    is left unspecified (this kernel does not write it): callers must not read k
    afterwards; attention reads K from the pool.
    """
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0:
        return
    check_last_dim_contiguous(q, k, v, kv, cos, sin)
    assert cos.stride() == sin.stride() and cos.dtype == sin.dtype == torch.float32
    half = D // 2
    bq, bk = next_pow2(HQ), next_pow2(HK)
    _rope_kv_kernel[(T,)](
        q, k, v, kv, positions, slots, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv.stride(0), kv.stride(1), cos.stride(0),
        HQ, HK, half,
        BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_HALF=next_pow2(half),
        num_warps=4 if bq * D >= 2048 else 2,
    )
