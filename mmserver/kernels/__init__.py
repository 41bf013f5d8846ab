"""Public kernel entry points.

Each dispatcher runs the triton kernel for CUDA tensors (or everywhere when the
env var MMSERVER_FORCE_TRITON=1, which tests combine with TRITON_INTERPRET=1)
and the plain-torch reference in `reference.py` otherwise. Triton is imported
lazily, so this package imports fine on machines without it.

Layouts (see the docstrings of `reference.py` for the exact math):
  KV pool of one layer: kv [num_slots, 2 * kv_heads, head_dim], K heads first.
  token_table [max_requests, max_len] int32: slot of (request row, position).
  Packed prefill batch: cu_q [B + 1] int32 offsets, prefix_lens [B], req_rows [B].

`rope_and_write_kv` fuses `apply_rope` + `write_kv` (one launch per layer instead
of two); it may leave k unrotated, so read K from the pool afterwards, never k.

Note: kernel modules share names with some dispatchers (e.g. `prefill_attention`);
load them with `kernel_module(name)`, not `import mmserver.kernels.<name>`.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

from . import reference

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
    "kernel_module",
    "use_triton",
]


def use_triton(x: torch.Tensor) -> bool:
    """Triton path for CUDA tensors, or anywhere when MMSERVER_FORCE_TRITON=1 (read per call)."""
    return x.is_cuda or os.environ.get("MMSERVER_FORCE_TRITON", "0") == "1"


def kernel_module(name: str) -> ModuleType:
    """Import the triton kernel module `name` (e.g. "rope") on first use."""
    full = f"{__name__}.{name}"
    mod = sys.modules.get(full)
    if mod is None:
        mod = importlib.import_module(full)
        # importing a submodule binds it as a package attribute, which would shadow
        # the dispatcher of the same name: put the dispatchers back
        globals().update(_DISPATCHERS)
    return mod


def embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    image_rows: torch.Tensor | None = None,
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, H]: weight[input_ids[t]], or image_rows[image_index[t]] (cast) where image_index[t] >= 0."""
    impl = kernel_module("embedding") if use_triton(weight) else reference
    return impl.embedding(input_ids, weight, image_rows, image_index)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF Qwen2RMSNorm of x [T, H]; with residual: x = x + residual first, returns (normed, x)."""
    impl = kernel_module("rmsnorm") if use_triton(x) else reference
    return impl.rms_norm(x, weight, eps, residual)


def rope_cos_sin(
    max_pos: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables [max_pos, head_dim // 2], bit-identical to HF's default rope."""
    return reference.rope_cos_sin(max_pos, head_dim, theta, device)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """In place: rotate_half rope on q [T, Hq, D] and k [T, Hk, D] at positions [T], float32 math."""
    impl = kernel_module("rope") if use_triton(q) else reference
    impl.apply_rope(q, k, positions, cos, sin)


def write_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """kv[slots[t], :Hk] = k[t]; kv[slots[t], Hk:] = v[t]."""
    impl = kernel_module("kv_write") if use_triton(kv) else reference
    impl.write_kv(kv, k, v, slots)


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
    """apply_rope(q, k, ...) then write_kv(kv, k, v, slots) in one launch; k is unspecified afterwards."""
    impl = kernel_module("rope_kv") if use_triton(q) else reference
    impl.rope_and_write_kv(q, k, v, kv, positions, slots, cos, sin)


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
    """Causal GQA attention [T, Hq, D] of packed new tokens over cached prefix + new K/V (already written)."""
    impl = kernel_module("prefill_attention") if use_triton(q) else reference
    return impl.prefill_attention(q, kv, token_table, req_rows, cu_q, prefix_lens, max_q_len, scale)


def decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    token_table: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """[B, Hq, D]: query of request b (position seq_lens[b] - 1) over keys 0..seq_lens[b] - 1.

    max_seq_len (Python int, an upper bound) only tunes the split-K count on GPU;
    keep it fixed across CUDA-graph capture and replay.
    """
    impl = kernel_module("decode_attention") if use_triton(q) else reference
    return impl.decode_attention(q, kv, token_table, req_rows, seq_lens, scale, max_seq_len)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, I]: silu(x[:, :I]) * x[:, I:] in x's dtype."""
    impl = kernel_module("silu_mul") if use_triton(x) else reference
    return impl.silu_and_mul(x)


def vit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal softmax(q k^T * scale) v over [N, heads, S, D]."""
    impl = kernel_module("vit_attention") if use_triton(q) else reference
    return impl.vit_attention(q, k, v, scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float) -> torch.Tensor:
    """Non-causal attention within each segment of packed [N, heads, D] rows (cu_seqlens [S + 1]
    int32 offsets; max_seqlen: the longest segment): a list of variable-size images in one call."""
    impl = kernel_module("varlen_attention") if use_triton(q) else reference
    return impl.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)


def mrope_cos_sin(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  section: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE: per-token cos/sin [T, D/2] gathered from the [max_pos, D/2] tables, frequency
    block j at position row j of positions [P, T] (one gather per forward, shared by every
    layer's `rope_and_write_kv`, which then reads row t for token t)."""
    return reference.mrope_cos_sin(positions, cos, sin, section)


_DISPATCHERS = {name: globals()[name] for name in __all__}
