"""Token embedding gather with image-feature rows spliced in (one program per token x hidden block)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_last_dim_contiguous, interpreting, next_pow2


@triton.jit
def _embedding_kernel(
    ids_ptr, img_idx_ptr, weight_ptr, img_ptr, out_ptr,
    H, stride_w, stride_img, stride_out,
    HAS_IMAGE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    img_row = -1
    if HAS_IMAGE:
        img_row = tl.load(img_idx_ptr + t)
    if img_row >= 0:
        row = tl.load(img_ptr + img_row.to(tl.int64) * stride_img + offs, mask=mask)
        row = row.to(out_ptr.dtype.element_ty)  # both branches must yield one dtype
    else:
        tok = tl.load(ids_ptr + t).to(tl.int64)
        row = tl.load(weight_ptr + tok * stride_w + offs, mask=mask).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t.to(tl.int64) * stride_out + offs, row, mask=mask)


def embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    image_rows: torch.Tensor | None = None,
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    T, H = input_ids.shape[0], weight.shape[1]
    out = torch.empty((T, H), dtype=weight.dtype, device=weight.device)
    if T == 0:
        return out
    has_image = image_rows is not None and image_index is not None and image_rows.shape[0] > 0
    if not has_image:
        image_rows, image_index = weight, input_ids  # dummies, never read
    check_last_dim_contiguous(weight, image_rows)
    block = min(next_pow2(H), 64 if interpreting() else 1024)
    grid = (T, triton.cdiv(H, block))
    _embedding_kernel[grid](
        input_ids, image_index, weight, image_rows, out,
        H, weight.stride(0), image_rows.stride(0), out.stride(0),
        HAS_IMAGE=has_image, BLOCK_H=block, num_warps=4,
    )
    return out
