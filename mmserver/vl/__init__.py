"""LMDeploy's `lmdeploy.vl` names: `load_image` (a path, URL, bytes or PIL image → RGB PIL image)."""

from __future__ import annotations

import base64
import urllib.request
from typing import Any

from ..models.image_io import alpha_on_white
from ..models.image_io import load_image as _load


def load_image(image: Any, timeout_s: float = 10.0):
    """A PIL RGB image from a PIL image, a path, bytes, an http(s) URL or a data: URL."""
    if isinstance(image, str) and image.startswith("data:"):
        image = base64.b64decode(image.partition(",")[2])
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        with urllib.request.urlopen(image, timeout=timeout_s) as r:
            image = r.read()
    return _load(image, to_rgb=alpha_on_white)


__all__ = ["load_image"]
