"""Which model class serves a checkpoint directory."""

from __future__ import annotations

import os

import torch

from .internvl.config import load_config
from .internvl.model import InternVLModel


def load_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True) -> InternVLModel:
    """Load any supported checkpoint; `load_config` raises a clear error for unsupported ones."""
    load_config(model_dir)  # validates before any weight is read
    return InternVLModel.load(model_dir, device=device, dtype=dtype, progress=progress)
