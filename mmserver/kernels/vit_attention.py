"""Non-causal full attention for the vision tower ([N, heads, S, D], S = 1025 for InternViT).

Grid: (query block, N * heads). Full key blocks run unmasked; only the ragged
last key block is masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._flash import LOG2E, softmax_step
from ._utils import check_last_dim_contiguous, dot_precision, interpreting, next_pow2


@triton.jit
def _dense_block(q, k_ptrs, v_ptrs, start, S, offs_n, d_mask, m_i, l_i, acc, qk_scale,
                 stride_ks, stride_vs, MASKED: tl.constexpr, PREC: tl.constexpr):
    n = start + offs_n
    n_mask = n < S
    mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptrs + start * stride_ks, mask=mask, other=0.0)
    v = tl.load(v_ptrs + start * stride_vs, mask=mask, other=0.0)
    return softmax_step(q, tl.trans(k), v, n_mask[None, :], m_i, l_i, acc, qk_scale, PREC, MASKED)


@triton.jit
def _vit_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, qk_scale,
    stride_qn, stride_qh, stride_qs, stride_kn, stride_kh, stride_ks,
    stride_vn, stride_vh, stride_vs, stride_on, stride_oh, stride_os,
    HEADS, S, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    m_blk = tl.program_id(0)
    nh = tl.program_id(1)
    n_idx = (nh // HEADS).to(tl.int64)
    h = (nh % HEADS).to(tl.int64)
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_mask = (offs_m < S)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + n_idx * stride_qn + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=q_mask, other=0.0)
    k_ptrs = k_ptr + n_idx * stride_kn + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = v_ptr + n_idx * stride_vn + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = (S // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _dense_block(q, k_ptrs, v_ptrs, start, S, offs_n, d_mask, m_i, l_i, acc, qk_scale,
                                     stride_ks, stride_vs, False, PREC)
    if full_end < S:
        m_i, l_i, acc = _dense_block(q, k_ptrs, v_ptrs, full_end, S, offs_n, d_mask, m_i, l_i, acc, qk_scale,
                                     stride_ks, stride_vs, True, PREC)
    out = acc / l_i[:, None]
    tl.store(out_ptr + n_idx * stride_on + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def vit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    N, HEADS, S, D = q.shape
    out = torch.empty((N, HEADS, S, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    check_last_dim_contiguous(q, k, v)
    block_d = max(16, next_pow2(D))
    if interpreting():
        block_m, block_n, warps, stages = 16, 16, 1, 1
    elif block_d <= 64:  # InternViT-300M; from a sweep on H100, on par with torch's flash SDPA
        block_m, block_n, warps, stages = 64, 64, 4, 3
    else:
        block_m, block_n, warps, stages = 128, 64, 8, 2
    grid = (triton.cdiv(S, block_m), N * HEADS)
    _vit_attention_kernel[grid](
        q, k, v, out, scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        HEADS, S, D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out
