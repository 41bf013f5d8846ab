"""Causal GQA prefill attention over a paged KV pool (token_table indirection), flash style.

Grid: (row block, request, kv head); a tile row is a (token, query head) pair.
Keys that every row of a block can see (positions < prefix + its first token)
are folded in without a causal mask; only the trailing diagonal blocks are masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._flash import LOG2E, softmax_step
from ._utils import check_last_dim_contiguous, dot_precision, interpreting, next_pow2


@triton.jit
def _paged_block(
    q, q_pos, table_row, k_base, v_base, start, end, stride_kv_s, offs_d, d_mask,
    m_i, l_i, acc, qk_scale,
    MASKED: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    slots = tl.load(table_row + offs_n, mask=n_mask, other=0).to(tl.int64)
    kv_mask = n_mask[:, None] & d_mask[None, :]
    kv_off = slots[:, None] * stride_kv_s + offs_d[None, :]
    k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
    valid = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
    return softmax_step(q, tl.trans(k), v, valid, m_i, l_i, acc, qk_scale, PREC, MASKED)


@triton.jit
def _prefill_attention_kernel(
    q_ptr, kv_ptr, out_ptr, table_ptr, req_rows_ptr, cu_q_ptr, prefix_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_kv_s, stride_kv_h, stride_ot, stride_oh, stride_table,
    HK, D,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    # Tile rows are (token, query head of this kv head) pairs, token-major, so each K/V
    # block is loaded once for the whole GQA group (matters for short/decode-like rows).
    # Heaviest (last) row blocks go first: better tail balance for causal work.
    m_blk = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if m_blk * BLOCK_M >= q_len * GROUP:
        return
    prefix = tl.load(prefix_ptr + b)
    row = tl.load(req_rows_ptr + b).to(tl.int64)

    rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_in_req = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    tok = (q_start + tok_in_req).to(tl.int64)
    q_mask = (tok_in_req < q_len)[:, None] & d_mask[None, :]
    q_off = tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
    q_pos = prefix + tok_in_req

    table_row = table_ptr + row * stride_table
    k_base = kv_ptr + kvh * stride_kv_h
    v_base = kv_ptr + (HK + kvh) * stride_kv_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    first_tok = (m_blk * BLOCK_M) // GROUP
    end = prefix + tl.minimum(q_len, ((m_blk + 1) * BLOCK_M - 1) // GROUP + 1)
    unmasked_end = ((prefix + first_tok) // BLOCK_N) * BLOCK_N
    for start in range(0, unmasked_end, BLOCK_N):
        m_i, l_i, acc = _paged_block(
            q, q_pos, table_row, k_base, v_base, start, end, stride_kv_s, offs_d, d_mask,
            m_i, l_i, acc, qk_scale, False, PREC, BLOCK_N,
        )
    for start in range(unmasked_end, end, BLOCK_N):
        m_i, l_i, acc = _paged_block(
            q, q_pos, table_row, k_base, v_base, start, end, stride_kv_s, offs_d, d_mask,
            m_i, l_i, acc, qk_scale, True, PREC, BLOCK_N,
        )
    out = acc / l_i[:, None]
    o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _config(rows: int, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for `rows` = max_q_len * group tile rows."""
    if interpreting():
        return 16, 16, 1, 1
    # picked by a sweep on H100 (bf16, head_dim 128, GQA 7); see bench.py
    if rows <= 16:
        return 16, 128, 4, 3
    if rows <= 64 or block_d > 128:
        return 64, 64, 4, 2
    return 128, 32, 4, 2


def prefill_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    token_table: torch.Tensor,
    req_rows: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
) -> torch.Tensor:
    T, HQ, D = q.shape
    HK = kv.shape[1] // 2
    B = req_rows.shape[0]
    out = torch.empty_like(q)
    if T == 0 or B == 0 or max_q_len <= 0:
        return out
    check_last_dim_contiguous(q, kv, token_table)
    block_d = max(16, next_pow2(D))
    group = HQ // HK
    block_m, block_n, warps, stages = _config(max_q_len * group, block_d)
    grid = (triton.cdiv(max_q_len * group, block_m), B, HK)
    _prefill_attention_kernel[grid](
        q, kv, out, token_table, req_rows, cu_q, prefix_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), out.stride(0), out.stride(1),
        token_table.stride(0),
        HK, D,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out
