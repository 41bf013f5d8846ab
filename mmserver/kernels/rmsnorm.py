"""RMSNorm (HF Qwen2RMSNorm rounding) with optional fused residual add; one program per row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_last_dim_contiguous, next_pow2, row_warps


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    H, eps, stride_x, stride_res, stride_out, stride_res_out,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    xf = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        # torch adds half types in fp32 and rounds once to the activation dtype: do the same
        x = (xf + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
        xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    normed = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    T, H = x.shape
    check_last_dim_contiguous(x, weight)
    out = torch.empty((T, H), dtype=torch.result_type(weight, x), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else out
    if residual is not None:
        check_last_dim_contiguous(residual)
    res_in = residual if residual is not None else x
    block = next_pow2(H)
    if T > 0:
        _rms_norm_kernel[(T,)](
            x, res_in, weight, out, res_out,
            H, eps, x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_H=block, num_warps=row_warps(block),
        )
    return (out, res_out) if residual is not None else out
