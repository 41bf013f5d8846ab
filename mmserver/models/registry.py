"""Which model class serves a checkpoint directory."""

from __future__ import annotations

import os

import torch

from .internvl.model import InternVLModel


def load_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True) -> InternVLModel:
    """Load any supported checkpoint. The config is read and checked before any weight is,
    so an unsupported checkpoint fails fast with a clear error."""
    return InternVLModel.load(model_dir, device=device, dtype=dtype, progress=progress)
