"""Decoding an image from a PIL image, a path or encoded bytes, every failure an ImageError:
shared by the families' preprocessing (each says how alpha becomes RGB)."""

from __future__ import annotations

import io
import os
from typing import Callable, Union

from PIL import Image, UnidentifiedImageError

from .errors import ImageError

ImageSource = Union[Image.Image, str, "os.PathLike[str]", bytes, bytearray, memoryview]
RGB = Callable[[Image.Image], Image.Image]


def drop_alpha(im: Image.Image) -> Image.Image:
    """``convert('RGB')``: alpha dropped (InternVL's loader)."""
    return im.convert("RGB")


def alpha_on_white(im: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (transformers' `convert_to_rgb`)."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def _check_pixels(width: int, height: int, index: int) -> None:
    """Reject empty images and decompression bombs with a readable message."""
    if width <= 0 or height <= 0:
        raise ImageError(index, f"image has zero size ({width}x{height})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageError(
            index, f"image is too large ({width}x{height} = {width * height} pixels, "
            f"limit {limit}); refusing to decode (possible decompression bomb)"
        )


def _open_and_load(fp: io.BytesIO | str, what: str, index: int, to_rgb: RGB) -> Image.Image:
    """Open, fully decode and RGB-convert an encoded image, mapping every failure to ImageError."""
    try:
        # Image.open only parses the header.  PIL raises DecompressionBombError above
        # 2x MAX_IMAGE_PIXELS but merely *warns* between 1x and 2x; _check_pixels turns
        # that band into an error too, before any pixel is decoded.  (No
        # warnings.catch_warnings() here: it mutates process-global state and is not
        # thread-safe, and decoding may run in a thread pool.)
        with Image.open(fp) as im:
            _check_pixels(im.width, im.height, index)
            im.load()  # decode now so truncated/corrupt data fails here, not mid-batch
            return to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(index, f"image is too large, possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(index, f"cannot decode {what} as an image (cannot identify image file)") from e
    except FileNotFoundError as e:
        raise ImageError(index, f"file not found: {fp!s}") from e
    except IsADirectoryError as e:
        raise ImageError(index, f"path is a directory, not an image file: {fp!s}") from e
    except PermissionError as e:
        raise ImageError(index, f"permission denied reading {fp!s}") from e
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        # PIL reports truncated/corrupt payloads as OSError ("image file is truncated"),
        # and some plugins raise ValueError/SyntaxError/EOFError on malformed headers.
        raise ImageError(index, f"cannot decode {what} as an image ({e})") from e


def load_image(src: ImageSource, index: int = 0, to_rgb: RGB = drop_alpha) -> Image.Image:
    """Load an image from a PIL image, a filesystem path, or raw encoded bytes, as RGB.

    `to_rgb` makes it RGB: by default alpha is dropped with a plain ``convert('RGB')`` (no
    compositing on white), exactly like the reference InternVL loader; `alpha_on_white` is
    transformers' (and Qwen2-VL's) rule.

    ``index`` is only used in error messages ("image {index}: ...") so a client sending
    several images can tell which one was bad.

    Raises:
        ImageError: missing file, undecodable/truncated data, zero-size image,
            decompression bomb, or an unsupported ``src`` type.
    """
    if isinstance(src, Image.Image):
        if src.width <= 0 or src.height <= 0:
            raise ImageError(index, f"image has zero size ({src.width}x{src.height})")
        try:
            src.load()  # a lazily opened PIL image may still be truncated on disk
            return src if src.mode == "RGB" else to_rgb(src)
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageError(index, f"cannot decode image data ({e})") from e

    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError(index, "cannot decode bytes as an image (empty data)")
        return _open_and_load(io.BytesIO(data), "bytes", index, to_rgb)

    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not path:
            raise ImageError(index, "empty path")
        return _open_and_load(path, f"file {path!r}", index, to_rgb)

    raise ImageError(
        index, f"unsupported image type {type(src).__name__!r} "
        "(expected PIL.Image.Image, a filesystem path, or encoded bytes)"
    )
