"""Tests for mmserver.models.internvl.preprocess.

Grid selection is checked against a literal transcription of OpenGVLab InternVL's
``find_closest_aspect_ratio`` / ``dynamic_preprocess``; pixel values against
transformers' PIL GOT-OCR2 image processor (the one InternVL's HF port uses).
"""

from __future__ import annotations

import io
import pathlib
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from mmserver.models.internvl.preprocess import (
    ImageError,
    find_grid,
    load_image,
    num_tiles,
    preprocess_image,
    tile_image,
    to_pixel_values,
)

# --------------------------------------------------------------------------------------
# Literal transcription of the reference code (OpenGVLab InternVL, e.g.
# internvl_chat/internvl/train/dataset.py and the HF model cards).  Do not "tidy" it:
# the set-then-sort candidate order is part of the behaviour under test.


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float('inf')
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])

    # find the closest aspect ratio to the target
    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size)

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images


def reference_grid(width, height, min_num, max_num, image_size=448):
    """Grid chosen by the reference code, without building any image."""
    aspect_ratio = width / height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size)


# --------------------------------------------------------------------------------------
# find_grid / num_tiles


def _coarse_sizes() -> list[int]:
    small = [1, 2, 3, 4, 5, 7, 10, 17, 33, 50, 64, 100, 224, 300, 447, 448, 449]
    return sorted(set(small + list(range(1, 4001, 97)) + [633, 634, 896, 1000, 2000, 4000]))


@pytest.mark.parametrize("max_num", [1, 6, 12])
def test_find_grid_matches_reference_sweep(max_num: int) -> None:
    sizes = _coarse_sizes()
    for w in sizes:
        for h in sizes:
            assert find_grid(w, h, 1, max_num) == reference_grid(w, h, 1, max_num), (w, h, max_num)


@pytest.mark.parametrize("min_num,max_num", [(1, 6), (1, 12), (2, 12), (4, 4), (5, 5), (8, 9)])
def test_find_grid_matches_reference_on_ties(min_num: int, max_num: int) -> None:
    """Exact-ratio images land on tie points, where candidate order and the area rule decide."""
    cands = {(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if min_num <= i * j <= max_num}
    ratios = {Fraction(i, j) for i, j in cands}
    # every candidate ratio, and every midpoint between two candidate ratios
    points = ratios | {(a + b) / 2 for a in ratios for b in ratios}
    for r in points:
        for k in (1, 3, 20, 100, 400, 1000):
            w, h = r.numerator * k, r.denominator * k
            if w > 20000 or h > 20000:
                continue
            assert find_grid(w, h, min_num, max_num) == reference_grid(w, h, min_num, max_num), (w, h)
    # square images walk through the (1,1) -> (2,2) -> (3,3) area thresholds
    for s in range(1, 4001, 3):
        assert find_grid(s, s, min_num, max_num) == reference_grid(s, s, min_num, max_num), s


@pytest.mark.parametrize(
    "w,h,max_num,grid,tiles",
    [
        (448, 448, 12, (1, 1), 1),
        (640, 480, 12, (4, 3), 13),
        (1280, 720, 12, (4, 2), 9),
        (720, 1280, 12, (2, 4), 9),
        (1000, 1000, 12, (3, 3), 10),
        (300, 900, 12, (1, 3), 4),
        (640, 480, 6, (3, 2), 7),
        (1280, 720, 6, (2, 1), 3),
        (640, 480, 1, (1, 1), 1),
    ],
)
def test_known_grids(w: int, h: int, max_num: int, grid: tuple[int, int], tiles: int) -> None:
    assert find_grid(w, h, 1, max_num) == grid
    assert num_tiles(w, h, max_num=max_num) == tiles
    assert num_tiles(w, h, max_num=max_num, use_thumbnail=False) == grid[0] * grid[1]


def test_find_grid_rejects_empty_size() -> None:
    with pytest.raises(ValueError):
        find_grid(0, 10, 1, 12)


# --------------------------------------------------------------------------------------
# tiles and pixel values


def _random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * w + h)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


def _hf_pixel_values(img: Image.Image, max_patches: int) -> tuple[torch.Tensor, int]:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
        size={"height": 448, "width": 448},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    out = proc(images=img, return_tensors="pt")
    return out["pixel_values"], int(out["num_patches"][0])


SIZES = [(448, 448), (640, 480), (1280, 720), (720, 1280), (300, 900), (17, 33), (1000, 1000), (2000, 300)]


@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pixel_values_equal_transformers(size: tuple[int, int], max_num: int) -> None:
    img = _random_image(*size)
    ours = preprocess_image(img, max_num=max_num)
    theirs, n = _hf_pixel_values(img, max_num)
    assert ours.dtype == torch.float32 and ours.shape == (num_tiles(*size, max_num=max_num), 3, 448, 448)
    assert n == ours.shape[0]
    assert torch.equal(ours, theirs)  # bitwise, not just allclose


@pytest.mark.parametrize("size", [(640, 480), (300, 900)])
def test_tiles_equal_reference_dynamic_preprocess(size: tuple[int, int]) -> None:
    img = _random_image(*size)
    ours = tile_image(img, max_num=12)
    ref = dynamic_preprocess(img, max_num=12, use_thumbnail=True)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.size == b.size == (448, 448)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_grayscale_equal_transformers() -> None:
    img = _random_image(640, 480, mode="L")
    assert torch.equal(preprocess_image(img, max_num=6), _hf_pixel_values(img, 6)[0])


def test_opaque_rgba_equal_transformers() -> None:
    img = _random_image(640, 480, mode="RGBA")
    img.putalpha(255)
    assert torch.equal(preprocess_image(img, max_num=6), _hf_pixel_values(img, 6)[0])


def test_translucent_rgba_follows_original_not_transformers() -> None:
    """Known divergence: InternVL drops alpha (convert('RGB')); transformers composites on white.

    With the alpha already dropped, the rest of the two pipelines is bit-identical.
    """
    img = _random_image(640, 480, mode="RGBA")
    ours = preprocess_image(load_image(img), max_num=6)
    assert torch.equal(ours, preprocess_image(img.convert("RGB"), max_num=6))
    assert torch.equal(ours, _hf_pixel_values(img.convert("RGB"), 6)[0])
    assert not torch.equal(ours, _hf_pixel_values(img, 6)[0])


def test_to_pixel_values_formula() -> None:
    """Every uint8 value maps to (x/255 - mean)/std computed in float32, as ToTensor+Normalize."""
    ramp = np.tile(np.arange(256, dtype=np.uint8), (448 * 448 // 256 + 1))[: 448 * 448].reshape(448, 448)
    tile = Image.fromarray(np.stack([ramp, ramp, ramp], axis=-1), mode="RGB")
    px = to_pixel_values([tile])
    x = torch.from_numpy(ramp).to(torch.float32).div(255)
    for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        expected = (x - torch.tensor(m, dtype=torch.float32)) / torch.tensor(s, dtype=torch.float32)
        assert torch.equal(px[0, c], expected)
    # transformers rescales in float64 (x * (1/255)) then casts; identical for all 256 values
    f64 = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    assert np.array_equal(f64, torch.arange(256).to(torch.float32).div(255).numpy())


def test_no_thumbnail_and_single_tile() -> None:
    img = _random_image(640, 480)
    assert len(tile_image(img, max_num=12, use_thumbnail=False)) == 12
    single = tile_image(img, max_num=1)
    assert len(single) == 1 and single[0].size == (448, 448)


def test_transformers_grid_differs_only_for_min_num_above_one() -> None:
    """Documented divergence: transformers orders same-area candidates width-major, the original
    by set iteration order.  It only matters on exact ties between two same-area grids, which
    needs min_num > 1 (unused by InternVL in practice).  We follow the original."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    # 5x2 image, exactly 4 tiles: (2,2) and (4,1) tie at |2.5 - 1| == |2.5 - 4|
    assert reference_grid(5, 2, 4, 4) == find_grid(5, 2, 4, 4) == (4, 1)
    assert get_optimal_tiled_canvas((2, 5), (448, 448), 4, 4) == (2, 2)
    # ... and with min_num == 1 the grids agree on a sweep including tie points
    for w in _coarse_sizes()[::3]:
        for h in _coarse_sizes()[::3]:
            assert find_grid(w, h, 1, 12) == get_optimal_tiled_canvas((h, w), (448, 448), 1, 12)


# --------------------------------------------------------------------------------------
# load_image


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_sources(tmp_path: pathlib.Path) -> None:
    img = _random_image(40, 30)
    data = _png_bytes(img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    expected = np.asarray(img)
    for src in (img, str(path), path, data, bytearray(data), memoryview(data)):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (40, 30)
        assert np.array_equal(np.asarray(out), expected), type(src)


def test_load_image_modes_drop_alpha_like_original() -> None:
    rgba = _random_image(20, 10, mode="RGBA")
    out = load_image(_png_bytes(rgba))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(rgba)[..., :3])  # no white compositing
    gray = _random_image(20, 10, mode="L")
    assert np.array_equal(np.asarray(load_image(gray)), np.asarray(gray.convert("RGB")))
    pal = _random_image(20, 10).convert("P")
    pal.info["transparency"] = 0
    assert load_image(_png_bytes(pal)).mode == "RGB"


def test_load_image_broken_bytes() -> None:
    with pytest.raises(ImageError, match=r"image 3: cannot decode bytes as an image \(cannot identify"):
        load_image(b"definitely not an image", index=3)
    with pytest.raises(ImageError, match=r"image 0: cannot decode bytes.*empty"):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_truncated(fmt: str) -> None:
    buf = io.BytesIO()
    _random_image(64, 64).save(buf, format=fmt)
    data = buf.getvalue()
    with pytest.raises(ImageError, match=r"image 1: cannot decode bytes as an image \(.*truncat"):
        load_image(data[: len(data) // 2], index=1)


def test_load_image_missing_and_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ImageError, match=r"image 2: file not found: .*nope\.png"):
        load_image(tmp_path / "nope.png", index=2)
    with pytest.raises(ImageError, match=r"image 0: path is a directory"):
        load_image(str(tmp_path))


@pytest.mark.parametrize("src", [None, 42, 1.5, np.zeros((4, 4, 3), np.uint8), ["a.png"]])
def test_load_image_unsupported_type(src: object) -> None:
    with pytest.raises(ImageError, match=r"image 5: unsupported image type"):
        load_image(src, index=5)  # type: ignore[arg-type]


def test_load_image_zero_size() -> None:
    with pytest.raises(ImageError, match=r"zero size \(0x0\)"):
        load_image(Image.new("RGB", (0, 0)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit", [300, 100])  # 400 px image: 1.33x (PIL only warns) and 4x (PIL raises)
def test_load_image_decompression_bomb(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    data = _png_bytes(_random_image(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageError, match=r"image 0: image is too large.*decompression bomb"):
        load_image(data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_on_gpu_is_bitwise_the_cpu() -> None:
    """Servers normalise tiles on the GPU: it must give the reference's bits."""
    from mmserver.models.internvl.preprocess import normalize_pixels

    raw = torch.randint(0, 256, (3, 448, 448, 3), dtype=torch.uint8)
    assert torch.equal(normalize_pixels(raw.cuda()).cpu(), normalize_pixels(raw))
