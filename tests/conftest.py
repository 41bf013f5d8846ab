"""Shared fixtures: tiny random-weight checkpoints (written once per session) and images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_tiny_internvl", ROOT / "scripts" / "make_tiny_internvl.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_tiny_internvl"] = mod
    spec.loader.exec_module(mod)
    return mod


def _load_all_families_generator():
    _load_generator()  # the InternVL writer, which make_tiny_checkpoint builds on
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_tiny_checkpoint"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def make_checkpoint():
    return _load_generator().make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, make_checkpoint):
    """Lazily-built checkpoints keyed by (layout, llm, vit, seed)."""
    made: dict[tuple, Path] = {}
    base = tmp_path_factory.mktemp("ckpt")

    def get(layout: str = "original", llm: str = "qwen2", vit: str = "300m", seed: int = 0, **kw) -> Path:
        key = (layout, llm, vit, seed, tuple(sorted(kw.items())))
        if key not in made:
            out = base / "-".join(str(k) for k in key[:4]) / str(len(made))
            make_checkpoint(str(out), layout=layout, llm=llm, size="tiny", seed=seed, dtype="float32", vit=vit, **kw)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def qwen_checkpoints(tmp_path_factory):
    """Lazily-built tiny Qwen2-VL / Qwen2.5-VL checkpoints keyed by (family, key_style, seed,
    other make_qwen_vl keywords)."""
    made: dict[tuple, Path] = {}
    base = tmp_path_factory.mktemp("qwen_ckpt")
    make = _load_all_families_generator().make_qwen_vl

    def get(family: str = "qwen2_vl", key_style: str = "legacy", seed: int = 0, **kw) -> Path:
        key = (family, key_style, seed, tuple(sorted(kw.items())))
        if key not in made:
            out = base / f"{family}-{key_style}-{seed}" / str(len(made))
            make(str(out), family=family, key_style=key_style, seed=seed, dtype="float32", **kw)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def llava_checkpoints(tmp_path_factory):
    """Lazily-built tiny LLaVA-1.5 / LLaVA-NeXT checkpoints keyed by (family, backbone, seed,
    other make_llava keywords: key_style, pad)."""
    made: dict[tuple, Path] = {}
    base = tmp_path_factory.mktemp("llava_ckpt")
    make = _load_all_families_generator().make_llava

    def get(family: str = "llava", backbone: str = "vicuna", seed: int = 0, **kw) -> Path:
        key = (family, backbone, seed, tuple(sorted(kw.items())))
        if key not in made:
            out = base / f"{family}-{backbone}-{seed}" / str(len(made))
            make(str(out), family=family, backbone=backbone, seed=seed, dtype="float32", **kw)
            made[key] = out
        return made[key]

    return get


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth structure plus noise, so resizing matters and tiles differ.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) % 256)], -1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGB")


@pytest.fixture
def image_factory():
    return random_image


@pytest.fixture(scope="session")
def ckpt(checkpoints):
    """The tiny Qwen2-backbone checkpoint in the original layout, shared by most tests."""
    return checkpoints("original", "qwen2")


@pytest.fixture(scope="session")
def pipe(ckpt):
    """An in-process pipeline on `ckpt` (float32, CPU); tests must leave its engine idle."""
    from mmserver import pipeline

    return pipeline(ckpt, device="cpu", dtype="float32")
