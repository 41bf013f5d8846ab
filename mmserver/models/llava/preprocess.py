"""LLaVA-1.5 and LLaVA-NeXT image preprocessing, exactly as transformers' `LlavaImageProcessorPil`
(CLIPImageProcessor) and `LlavaNextImageProcessorPil`, and the token counts of their processors.

LLaVA-1.5: RGB (alpha on white) → [pad to a square with the mean colour, if `do_pad`] → PIL
bicubic resize of the shortest side to 336 (the long side `int(336·long/short)`) → center crop
336×336: one tile, 576 tokens (CLS dropped).

LLaVA-NeXT ("anyres"): the best-fit resolution among `image_grid_pinpoints` (the most effective
pixels, then the least waste) → resize to fit it keeping the aspect ratio (ceil) → zero-pad to it,
centred → 336×336 tiles in raster order, after a base tile (the whole image resized to 336×336).
Tokens: 576 for the base, plus the tiles' 24-per-tile grid with the padding rows / columns removed
(`unpad`) and one `image_newline` per remaining row — all from the image size alone.

The compact form for the wire is the uint8 tiles `[n, 336, 336, 3]`; `normalize` finishes them
(×1/255 in float64 → float32, then (x − mean) / std in float32, as the processor).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import ImageError
from ..image_io import ImageSource, alpha_on_white, load_image
from .config import LLAVA_NEXT, LlavaConfig


def select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """transformers' `select_best_resolution` over [h, w] pinpoints: (h, w)."""
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def fit_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """`get_patch_output_size`: the size (h, w) that fits `target` keeping the aspect ratio."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def unpadded_grid(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int, int]:
    """The tiles' feature grid (grid_h × grid_w) with the padding removed, as the model's
    `unpad_image` and the processor's `_get_unpadded_features`: (rows, cols, offset) where
    offset is the rows (or columns) cut at the top (or left)."""
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return grid_h - 2 * pad, grid_w, pad
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return grid_h, grid_w - 2 * pad, pad


def num_tokens(cfg: LlavaConfig, width: int, height: int, index: int = 0) -> int:
    """Embedding rows of a width×height image (the processor's count, from the size alone)."""
    if width <= 0 or height <= 0:
        raise ImageError(index, f"image has zero size ({width}x{height})")
    if cfg.kind != LLAVA_NEXT:
        return cfg.tile_tokens
    side = cfg.vision.image_size
    bh, bw = select_best_resolution(height, width, cfg.pinpoints)
    g = cfg.vision.grid
    rows, cols, _ = unpadded_grid(height, width, g * (bh // side), g * (bw // side))
    return cfg.tile_tokens + rows * cols + (rows if cfg.image_newline else 0)


def _resize(img: Image.Image, h: int, w: int, resample: int) -> Image.Image:
    return img if img.size == (w, h) else img.resize((w, h), resample=resample)


def _shortest_edge_crop(cfg: LlavaConfig, img: Image.Image) -> np.ndarray:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
    nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
    x = np.asarray(_resize(img, nh, nw, cfg.resample), dtype=np.uint8)
    if not cfg.do_center_crop:
        return x
    ch, cw = cfg.crop
    top, left = (nh - ch) // 2, (nw - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= nh and left + cw <= nw:
        return x[top:top + ch, left:left + cw]
    out = np.zeros((max(ch, nh), max(cw, nw), 3), dtype=np.uint8)  # too small: zero-padded, as the processor
    tp, lp = math.ceil((out.shape[0] - nh) / 2), math.ceil((out.shape[1] - nw) / 2)
    out[tp:tp + nh, lp:lp + nw] = x
    top, left = top + tp, left + lp
    return out[max(0, top):min(out.shape[0], top + ch), max(0, left):min(out.shape[1], left + cw)]


def _pad_square(cfg: LlavaConfig, img: Image.Image) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), tuple(int(m * 255) for m in cfg.image_mean))
    out.paste(img, ((side - w) // 2, 0) if h > w else (0, (side - h) // 2))
    return out


def tiles_uint8(cfg: LlavaConfig, image: ImageSource, index: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image as the processor's tiles before rescaling: uint8 [n, S, S, 3], and its (h, w)."""
    img = load_image(image, index, to_rgb=alpha_on_white)
    size = (img.height, img.width)
    side = cfg.vision.image_size
    if cfg.kind != LLAVA_NEXT:
        if cfg.do_pad:
            img = _pad_square(cfg, img)
        tiles = _shortest_edge_crop(cfg, img)[None]
    else:
        bh, bw = select_best_resolution(img.height, img.width, cfg.pinpoints)
        nh, nw = fit_size(img.height, img.width, (bh, bw))
        resized = np.asarray(_resize(img, nh, nw, cfg.resample), dtype=np.uint8)
        canvas = np.zeros((bh, bw, 3), dtype=np.uint8)
        y0, x0 = (bh - nh) // 2, (bw - nw) // 2
        canvas[y0:y0 + nh, x0:x0 + nw] = resized
        base = np.asarray(_resize(img, side, side, cfg.resample), dtype=np.uint8)
        parts = [base] + [canvas[y:y + side, x:x + side] for y in range(0, bh, side) for x in range(0, bw, side)]
        tiles = np.stack(parts)
    if tiles.shape[1:3] != (side, side):
        raise ImageError(index, f"preprocessing gave {tiles.shape[1]}x{tiles.shape[2]} tiles, not {side}x{side}")
    return torch.from_numpy(np.array(tiles, dtype=np.uint8, copy=True)), size


def normalize(tiles: torch.Tensor, cfg: LlavaConfig) -> torch.Tensor:
    """uint8 [n, S, S, 3] (any device) → float32 [n, 3, S, S], bit for bit the processor's."""
    x = tiles.permute(0, 3, 1, 2).to(torch.float64).mul(cfg.rescale_factor).to(torch.float32)
    dev = x.device
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=dev)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=dev)[:, None, None]
    return ((x - mean) / std).contiguous()
