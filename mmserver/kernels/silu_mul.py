"""silu(gate) * up over x = [gate | up]; 2D grid of (token, column block)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_last_dim_contiguous, interpreting, next_pow2


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, INTER, stride_x, stride_out, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x + INTER + offs, mask=mask, other=0.0)
    # HF rounds silu(gate) to the activation dtype before the multiply
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    T, two_i = x.shape
    inter = two_i // 2
    check_last_dim_contiguous(x)
    out = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block = min(next_pow2(inter), 128 if interpreting() else 1024)
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4,
    )
    return out
