"""Plain-torch reference implementations of every kernel.

These double as the CPU path of the engine, so they are vectorised where that
is cheap and compute in float32 wherever the HF model does (norms, rope,
softmax), casting back to the activation dtype at the same points HF does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "embedding",
    "rms_norm",
    "rope_cos_sin",
    "apply_rope",
    "write_kv",
    "rope_and_write_kv",
    "prefill_attention",
    "decode_attention",
    "silu_and_mul",
    "vit_attention",
    "varlen_attention",
    "mrope_cos_sin",
]


def embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    image_rows: torch.Tensor | None = None,
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token embedding lookup with image-feature rows spliced in where image_index >= 0."""
    out = weight[input_ids.long()]
    if image_rows is None or image_index is None or image_rows.shape[0] == 0:
        return out
    is_image = image_index >= 0
    # clamp so text positions (-1) index a valid row; torch.where discards them
    rows = image_rows[image_index.long().clamp(min=0)].to(weight.dtype)
    return torch.where(is_image[:, None], rows, out)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF Qwen2RMSNorm; with `residual`, first x = x + residual and return (normed, x)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return (out, x) if residual is not None else out


def rope_cos_sin(
    max_pos: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_pos, head_dim // 2] in float32, bit-identical to HF's default rope.

    HF builds inv_freq on the CPU at init and then multiplies float positions by
    it elementwise on the model's device; the second half of HF's cos/sin is a
    copy of the first, so only head_dim // 2 columns are stored.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    inv_freq = inv_freq.to(device)
    pos = torch.arange(max_pos, device=device, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """In-place neox/rotate_half rope on q [T,Hq,D] and k [T,Hk,D], float32 math."""
    c = cos[positions][:, None, :]
    s = sin[positions][:, None, :]
    _rotate(q, c, s)
    _rotate(k, c, s)


def write_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """kv[slot, :Hk] = k, kv[slot, Hk:] = v."""
    hk = k.shape[1]
    slots = slots.long()
    kv[slots, :hk] = k.to(kv.dtype)
    kv[slots, hk:] = v.to(kv.dtype)


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
    """apply_rope then write_kv (k ends up rotated here; the fused kernel leaves it unspecified)."""
    apply_rope(q, k, positions, cos, sin)
    write_kv(kv, k, v, slots)


def _gather_kv(kv: torch.Tensor, slots: torch.Tensor, hk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (float32) of the given slots: each [..., Hk, D]."""
    rows = kv[slots.long()].float()
    return rows[..., :hk, :], rows[..., hk:, :]


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
    """Causal GQA attention of packed new tokens over their requests' cached + new K/V."""
    hk = kv.shape[1] // 2
    out = torch.empty_like(q)
    starts, rows, prefixes = cu_q.tolist(), req_rows.tolist(), prefix_lens.tolist()
    for b, (row, prefix) in enumerate(zip(rows, prefixes)):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        q_len = hi - lo
        k, v = _gather_kv(kv, token_table[row, : prefix + q_len], hk)
        # query i (absolute position prefix + i) sees keys 0..prefix + i
        q_pos = torch.arange(prefix, prefix + q_len, device=q.device)
        k_pos = torch.arange(prefix + q_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            q[lo:hi].float().transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out


def decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    token_table: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """One query per request (position seq_len - 1) over keys 0..seq_len - 1, batched with padding."""
    hk = kv.shape[1] // 2
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item()) if seq_lens.numel() else 0
    if q.shape[0] == 0 or max_seq_len == 0:
        return torch.zeros_like(q)
    pos = torch.arange(max_seq_len, device=q.device)
    valid = pos[None, :] < seq_lens[:, None]  # [B, L]
    slots = token_table[req_rows.long(), :max_seq_len]
    # padding positions may hold stale/garbage slots: point them at slot 0, masked anyway
    k, v = _gather_kv(kv, torch.where(valid, slots, 0), hk)  # [B, L, Hk, D]
    o = F.scaled_dot_product_attention(
        q.float()[:, :, None, :],  # [B, Hq, 1, D]
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    # rows with seq_len 0 (CUDA-graph padding) have no keys: zeros, like the kernel
    return torch.where((seq_lens > 0)[:, None, None], o[:, :, 0, :], 0.0).to(q.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the input dtype, like HF's act_fn(gate_proj(x)) * up_proj(x)."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


def vit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Full (non-causal) attention over [N, heads, S, D] in float32."""
    o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    return o.to(q.dtype)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float) -> torch.Tensor:
    """Full (non-causal) attention within each segment of a packed sequence: q, k, v [N, heads, D],
    segment s = rows cu_seqlens[s]..cu_seqlens[s+1]-1; float32 math, output in q's dtype."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        o = F.scaled_dot_product_attention(q[lo:hi].float().transpose(0, 1), k[lo:hi].float().transpose(0, 1),
                                           v[lo:hi].float().transpose(0, 1), scale=scale)
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out


def mrope_cos_sin(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  section: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token M-RoPE tables [T, D/2] from positions [P, T] (P = len(section)): rotary
    frequency i uses position row r for the i-th frequencies of `section` (Qwen2-VL: 16 t, 24 h,
    24 w), i.e. out[t, i] = cos[positions[row(i), t], i]; bit-identical to transformers'
    recomposed M-RoPE cos/sin since the tables are."""
    half = cos.shape[1]
    rows = torch.repeat_interleave(torch.arange(len(section), device=positions.device),
                                   torch.tensor(section, device=positions.device), output_size=half)
    idx = positions[rows].T  # [T, D/2]: the position each frequency of each token uses
    cols = torch.arange(half, device=positions.device)
    return cos[idx, cols], sin[idx, cols]
