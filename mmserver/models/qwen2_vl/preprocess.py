"""Qwen2-VL image preprocessing, exactly as transformers' `Qwen2VLImageProcessorPil`.

RGB (alpha composited onto white) → `smart_resize` to multiples of 28 with the pixel count in
[min_pixels, max_pixels] → PIL bicubic → ×(1/255) in float64, then float32 → (x − mean) / std
with the CLIP constants, in float32 → 14×14 patches, each duplicated to 2 frames, in block-major
order (the 2×2 merge blocks in raster order; inside a block TL, TR, BL, BR): `[gh·gw, 1176]`,
grid (1, gh, gw). The image then costs gh·gw/4 tokens, known from its size alone.

The compact form for the wire is the resized uint8 image `[H', W', 3]`; `patchify` finishes it
with the same float operations (on any device) into the same values.

A video is its (sampled, resized, even-count) frames `[F, H', W', 3]`; `patchify_video` makes
transformers' video `pixel_values_videos` with the same float operations: rows t_grid, then the
merge blocks as for an image; columns C, T, P, P, where frames 2k and 2k+1 are temporal patch k.
An image is exactly a video of itself twice.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import ImageError
from ..image_io import ImageSource, alpha_on_white, load_image


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """transformers' `smart_resize` (Python's round: ties to even). ValueError past 200:1."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def plan(width: int, height: int, min_pixels: int, max_pixels: int, patch: int = 14,
         merge: int = 2, index: int = 0) -> tuple[int, int, int]:
    """The grid (t, gh, gw) of a width×height image; its tokens are t·gh·gw / merge²."""
    if width <= 0 or height <= 0:
        raise ImageError(index, f"image has zero size ({width}x{height})")
    try:
        h, w = smart_resize(height, width, patch * merge, min_pixels, max_pixels)
    except ValueError as e:
        raise ImageError(index, str(e)) from None
    return (1, h // patch, w // patch)


def resize_rgb(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """An RGB image resized as the processor does (PIL bicubic; unchanged if already that size):
    uint8 [height, width, 3]."""
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def resized_uint8(image: ImageSource, min_pixels: int, max_pixels: int, patch: int = 14, merge: int = 2,
                  index: int = 0) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The RGB image resized as the processor does: uint8 [H', W', 3] and its grid."""
    img = load_image(image, index, to_rgb=alpha_on_white)
    grid = plan(img.width, img.height, min_pixels, max_pixels, patch, merge, index)
    return resize_rgb(img, grid[1] * patch, grid[2] * patch), grid


def _normalize(frames: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [F, H, W, C] → float32 [F, C, H, W]: float64 × (1/255) rounded to float32, then
    float32 subtract and divide (each one IEEE op), as the processor."""
    x = frames.permute(0, 3, 1, 2).to(torch.float64).mul(1 / 255).to(torch.float32)
    dev = x.device
    return (x - torch.tensor(mean, dtype=torch.float32, device=dev)[:, None, None]) \
        / torch.tensor(std, dtype=torch.float32, device=dev)[:, None, None]


def _patches(x: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """float [F, C, H, W] (F a multiple of `temporal`) → [t·gh·gw, C·T·P·P] in transformers'
    order: rows (t, block row, block col, row in block, col in block), columns (C, T, P, P)."""
    f, c, h, w = x.shape
    t, gh, gw = f // temporal, h // patch, w // patch
    x = x.reshape(t, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * gh * gw, c * temporal * patch * patch).contiguous()


def patchify(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], patch: int = 14,
             merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """uint8 [H', W', 3] (any device) → float32 patches [gh·gw, C·T·P·P], bit for bit the
    processor's: the image as a video of itself `temporal` times (normalized once)."""
    x = _normalize(image[None], mean, std)
    return _patches(x.expand(temporal, -1, -1, -1), patch, merge, temporal)


def patchify_video(frames: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], patch: int = 14,
                   merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """uint8 frames [F, H', W', 3] (F a multiple of `temporal`; any device) → float32 patches
    [t·gh·gw, C·T·P·P], t = F / temporal: transformers' `pixel_values_videos`."""
    if frames.dim() != 4 or frames.shape[0] % temporal:
        raise ValueError(f"video frames {tuple(frames.shape)}: expected [F, H, W, 3] with F a multiple of {temporal}")
    return _patches(_normalize(frames, mean, std), patch, merge, temporal)
