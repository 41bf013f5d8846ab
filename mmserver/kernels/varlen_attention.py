"""Non-causal attention within the segments of a packed sequence (Qwen2-VL's ViT: several
variable-size images, or Qwen2.5-VL's windows, in one call): q, k, v [N, heads, D] with
`cu_seqlens` [S + 1] segment offsets.

Grid: (query block, segment * heads); blocks past a segment's end exit at once. Full key
blocks run unmasked; only the ragged last key block of a segment is masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._flash import LOG2E, softmax_step
from ._utils import check_last_dim_contiguous, dot_precision, interpreting, next_pow2


@triton.jit
def _block(q, k_ptrs, v_ptrs, start, end, offs_n, d_mask, m_i, l_i, acc, qk_scale, stride_kn, stride_vn,
           MASKED: tl.constexpr, PREC: tl.constexpr):
    n = start + offs_n
    n_mask = n < end
    mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptrs + start * stride_kn, mask=mask, other=0.0)
    v = tl.load(v_ptrs + start * stride_vn, mask=mask, other=0.0)
    return softmax_step(q, tl.trans(k), v, n_mask[None, :], m_i, l_i, acc, qk_scale, PREC, MASKED)


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr, qk_scale,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    HEADS, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    m_blk = tl.program_id(0)
    sh = tl.program_id(1)
    seg = sh // HEADS
    h = (sh % HEADS).to(tl.int64)
    lo = tl.load(cu_ptr + seg).to(tl.int64)
    hi = tl.load(cu_ptr + seg + 1).to(tl.int64)
    if m_blk * BLOCK_M >= hi - lo:
        return
    offs_m = lo + m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_mask = (offs_m < hi)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + offs_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    k_ptrs = k_ptr + (lo + offs_n)[:, None] * stride_kn + h * stride_kh + offs_d[None, :]
    v_ptrs = v_ptr + (lo + offs_n)[:, None] * stride_vn + h * stride_vh + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    length = hi - lo
    full_end = (length // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _block(q, k_ptrs, v_ptrs, start, length, offs_n, d_mask, m_i, l_i, acc, qk_scale,
                               stride_kn, stride_vn, False, PREC)
    if full_end < length:
        m_i, l_i, acc = _block(q, k_ptrs, v_ptrs, full_end, length, offs_n, d_mask, m_i, l_i, acc, qk_scale,
                               stride_kn, stride_vn, True, PREC)
    out = acc / l_i[:, None]
    tl.store(out_ptr + offs_m[:, None] * stride_on + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float) -> torch.Tensor:
    N, HEADS, D = q.shape
    out = torch.empty_like(q)
    segments = cu_seqlens.numel() - 1
    if out.numel() == 0 or segments <= 0 or max_seqlen <= 0:
        return out
    check_last_dim_contiguous(q, k, v)
    block_d = max(16, next_pow2(D))
    if interpreting():
        block_m, block_n, warps, stages = 16, 16, 1, 1
    elif block_d <= 64:
        block_m, block_n, warps, stages = 64, 64, 4, 3
    else:  # Qwen2-VL's head_dim 80 → 128
        block_m, block_n, warps, stages = 128, 64, 8, 2
    grid = (triton.cdiv(max_seqlen, block_m), segments * HEADS)
    _varlen_attention_kernel[grid](
        q, k, v, out, cu_seqlens, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        HEADS, D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out
