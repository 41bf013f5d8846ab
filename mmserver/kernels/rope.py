"""In-place neox ("rotate_half") rotary embedding of q and k; one program per token."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_last_dim_contiguous, next_pow2


@triton.jit
def _rotate_heads(ptr, stride_h, n_heads, c, s, HALF, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate all n_heads heads of one token (ptr points at head 0, dim 0) in place, fp32 math."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < HALF)
    p1 = ptr + heads * stride_h + dims
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * c + x1 * s).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
    HQ, HK, HALF,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + pos * stride_cos + dims, mask=dims < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + dims, mask=dims < HALF, other=0.0)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, HQ, c, s, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, HK, c, s, HALF, BLOCK_HK, BLOCK_HALF)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0:
        return
    check_last_dim_contiguous(q, k, cos, sin)
    assert cos.stride() == sin.stride() and cos.dtype == sin.dtype == torch.float32
    half = D // 2
    bq, bk = next_pow2(HQ), next_pow2(HK)
    _rope_kernel[(T,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        HQ, HK, half,
        BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_HALF=next_pow2(half),
        num_warps=4 if bq * D >= 2048 else 2,
    )
