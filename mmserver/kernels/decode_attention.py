"""Paged GQA decode attention with optional split-K (flash-decoding).

One program handles all query heads of one kv head (the group is padded to 16
rows so the QK^T and PV products run on tensor cores), over one split of the
request's keys. With more than one split, a second kernel merges the partial
results by their log-sum-exp. The split count is a host-side function of the
batch size and the caller's max_seq_len only, so launches are CUDA-graph safe.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._flash import LOG2E, softmax_step
from ._utils import check_last_dim_contiguous, dot_precision, interpreting, next_pow2

MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


@triton.jit
def _decode_attention_kernel(
    q_ptr, kv_ptr, out_ptr, part_out_ptr, part_lse_ptr, table_ptr, req_rows_ptr, seq_lens_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_kv_s, stride_kv_h, stride_ob, stride_oh, stride_table,
    HK, GROUP, D,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    row = tl.load(req_rows_ptr + b).to(tl.int64)
    # split boundaries on BLOCK_N multiples so only a split's last block is ragged
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(seq_len, start + chunk)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    heads = kvh * GROUP + offs_g
    hd_mask = (offs_g < GROUP)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hd_mask, other=0.0)

    table_row = table_ptr + row * stride_table
    k_base = kv_ptr + kvh * stride_kv_h
    v_base = kv_ptr + (HK + kvh) * stride_kv_h
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n in range(start, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        slots = tl.load(table_row + offs_n, mask=n_mask, other=0).to(tl.int64)
        kv_off = slots[:, None] * stride_kv_s + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
        m_i, l_i, acc = softmax_step(q, tl.trans(k), v, n_mask[None, :], m_i, l_i, acc, qk_scale, PREC, True)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0 (graph padding rows) -> zeros
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        # empty splits (start >= seq_len) store lse = -inf and zeros; the merge gives them weight 0
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        part_row = (b * HK * GROUP + heads).to(tl.int64) * NUM_SPLITS + split  # [B, HQ, NUM_SPLITS]
        tl.store(part_out_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], out, mask=hd_mask)
        tl.store(part_lse_ptr + part_row, lse, mask=offs_g < GROUP)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, HQ, D,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    base = (b * HQ + h).to(tl.int64) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    part = tl.load(part_out_ptr + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                   mask=s_mask[:, None], other=0.0)
    lse_max = tl.max(lse, 0)
    # all splits empty only when seq_len == 0 (graph padding rows): give zeros, not NaN
    w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(lse_max > float("-inf"), lse_max, 0.0)), 0.0)
    out = tl.sum(part * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, kv_heads: int, max_seq_len: int | None, device: torch.device) -> int:
    """Split only when batch * kv_heads programs leave SMs idle: then aim for ~2 programs
    per SM, never with splits shorter than MIN_KEYS_PER_SPLIT."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    programs = max(1, batch * kv_heads)
    if programs >= sms:
        return 1
    cap = MAX_SPLITS if max_seq_len is None else triton.cdiv(max_seq_len, MIN_KEYS_PER_SPLIT)
    want = triton.cdiv(2 * sms, programs)
    return max(1, min(want, cap, MAX_SPLITS))


def _config(block_d: int, num_splits: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel. On H100 (head_dim 128, graph
    replay) configs from (64..128, 2..4 warps, 2..3 stages) were within ~5% of each other."""
    if interpreting():
        return 16, 1, 1
    return 64, 4, 3


def decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    token_table: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    B, HQ, D = q.shape
    HK = kv.shape[1] // 2
    out = torch.empty_like(q)
    if B == 0:
        return out
    check_last_dim_contiguous(q, kv, token_table)
    if num_splits is None:
        num_splits = choose_num_splits(B, HK, max_seq_len, q.device)
    group = HQ // HK
    block_d = max(16, next_pow2(D))
    block_n, warps, stages = _config(block_d, num_splits)
    if num_splits > 1:
        part_out = torch.empty((B, HQ, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, HQ, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_attention_kernel[(B, HK, num_splits)](
        q, kv, out, part_out, part_lse, token_table, req_rows, seq_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), out.stride(0), out.stride(1),
        token_table.stride(0),
        HK, group, D,
        NUM_SPLITS=num_splits, BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        PREC=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(B, HQ)](
            part_out, part_lse, out, out.stride(0), out.stride(1), HQ, D,
            NUM_SPLITS=num_splits, BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2,
        )
    return out
