"""InternVL image preprocessing ("dynamic high resolution" tiling).

This reproduces, bit for bit, the reference pipeline that InternVL checkpoints
were trained with (OpenGVLab ``load_image`` / ``dynamic_preprocess`` /
``build_transform``): pick a tile grid whose aspect ratio is closest to the
image's, resize the whole image to that grid with PIL bicubic, cut it into
448x448 tiles row-major, append a 448x448 thumbnail of the whole image, then
apply torchvision-style ``ToTensor`` + ImageNet ``Normalize``.  Any deviation
(grid choice, resampling filter, float rounding) changes the vision
embeddings, so the rules here are copied exactly rather than "improved".

Only PIL, numpy and torch are used (no torchvision).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from ..errors import ImageError
from ..image_io import ImageSource, load_image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageError",
    "ImageSource",
    "find_grid",
    "load_image",
    "normalize_pixels",
    "num_tiles",
    "preprocess_image",
    "tile_image",
    "tile_pixels",
    "to_pixel_values",
    "to_uint8_tiles",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- tiling


@functools.lru_cache(maxsize=4096)
def find_grid(width: int, height: int, min_num: int, max_num: int, tile: int = 448) -> tuple[int, int]:
    """Return the (cols, rows) tile grid InternVL uses for a width x height image.

    Literal port of ``find_closest_aspect_ratio`` + the candidate list of
    ``dynamic_preprocess``: candidates are a *set* sorted by area (so same-area
    candidates keep CPython's set iteration order, as in the original), the
    first grid with the smallest |W/H - cols/rows| wins, and on an exact tie a
    later (larger) grid replaces it only while the image area exceeds half the
    grid's pixel area.  Cached because servers see the same sizes repeatedly.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    candidates = sorted(target_ratios, key=lambda x: x[0] * x[1])

    best_ratio_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in candidates:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * tile * tile * ratio[0] * ratio[1]:
                best = ratio
    return best


def tile_image(
    img: Image.Image,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    tile: int = 448,
) -> list[Image.Image]:
    """Split an image into InternVL tiles (row-major), plus a whole-image thumbnail.

    The thumbnail is only added when there is more than one tile, as in the
    reference; ``max_num <= 1`` degenerates to a single bicubic resize to
    ``tile x tile`` (what InternVL does with ``max_num=1``).
    """
    if img.mode != "RGB":
        img = img.convert("RGB")  # same as the reference transform's convert Lambda
    bicubic = Image.Resampling.BICUBIC
    if max_num <= 1:
        return [img.resize((tile, tile), bicubic)]

    cols, rows = find_grid(img.width, img.height, min_num, max_num, tile)
    resized = img.resize((tile * cols, tile * rows), bicubic)
    tiles = []
    for i in range(cols * rows):
        c, r = i % cols, i // cols
        tiles.append(resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(img.resize((tile, tile), bicubic))
    return tiles


def num_tiles(
    width: int,
    height: int,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    tile: int = 448,
) -> int:
    """Number of tiles ``tile_image`` yields for a width x height image, without touching pixels.

    Lets the server size the prompt (image tokens per tile x tiles) before decoding.
    """
    if max_num <= 1:
        return 1
    cols, rows = find_grid(width, height, min_num, max_num, tile)
    n = cols * rows
    return n + 1 if use_thumbnail and n != 1 else n


# --------------------------------------------------------------------------- tensors

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)


def to_uint8_tiles(tiles: list[Image.Image]) -> torch.Tensor:
    """Stack tiles into a uint8 [n, H, W, 3] tensor (the raw pixels, a quarter of the float bytes)."""
    if not tiles:
        raise ValueError("no tiles to stack: at least one tile is needed")
    arrays = []
    for t in tiles:
        if t.mode != "RGB":
            t = t.convert("RGB")
        arrays.append(np.asarray(t, dtype=np.uint8))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"tiles have different sizes: {sorted({a.shape for a in arrays})}")
    return torch.from_numpy(np.stack(arrays))


def normalize_pixels(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 [n, H, W, 3] (any device) → float32 [n, 3, H, W], ImageNet-normalised.

    Performs the same float32 ops in the same order as torchvision's ``ToTensor``
    (``uint8 -> float32``, ``div(255)``) and ``Normalize`` (``sub_(mean).div_(std)`` with
    float32 mean/std). Each is one correctly rounded IEEE operation, so the result is
    bitwise the reference's on the CPU and on a GPU alike (servers run it on the GPU,
    after copying the 4x smaller uint8 tiles).
    """
    x = tiles.permute(0, 3, 1, 2).to(dtype=torch.float32)
    if x.device.type == "cpu":
        x = x.div(255)
    else:  # CUDA divides by a Python scalar as a multiply by its reciprocal: not the IEEE quotient
        x = x.div(torch.tensor(255.0, device=x.device))
    x.sub_(_MEAN.to(x.device)).div_(_STD.to(x.device))
    return x.contiguous()


def to_pixel_values(tiles: list[Image.Image]) -> torch.Tensor:
    """Stack tiles into a float32 [n, 3, H, W] tensor, ImageNet-normalised (bitwise the reference)."""
    return normalize_pixels(to_uint8_tiles(tiles))


def tile_pixels(
    img: Image.Image,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    tile: int = 448,
) -> torch.Tensor:
    """`preprocess_image` up to the normalisation: uint8 [n, tile, tile, 3]; see `normalize_pixels`."""
    return to_uint8_tiles(tile_image(img, max_num=max_num, min_num=min_num, use_thumbnail=use_thumbnail, tile=tile))


def preprocess_image(
    img: Image.Image,
    max_num: int = 12,
    min_num: int = 1,
    use_thumbnail: bool = True,
    tile: int = 448,
) -> torch.Tensor:
    """Full InternVL preprocessing of one RGB image: tiles -> normalised float32 [n, 3, tile, tile]."""
    return normalize_pixels(tile_pixels(img, max_num=max_num, min_num=min_num, use_thumbnail=use_thumbnail, tile=tile))
