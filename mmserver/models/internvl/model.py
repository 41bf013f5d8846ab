"""The whole InternVL model: config + vision encoder + language model, loaded from disk."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..parallel import TPGroup, load_for_rank
from ..llm.decoder import DecoderLM
from .config import InternVLConfig, load_config
from .vision import VisionEncoder
from .weights import load_weights


class InternVLModel:
    """With `tp` (size > 1) `weights` are this rank's shard; see `mmserver.models.parallel`."""

    def __init__(self, cfg: InternVLConfig, weights: dict[str, torch.Tensor], model_dir: Path,
                 tp: TPGroup | None = None):
        self.cfg = cfg
        self.model_dir = model_dir
        self.tp = tp
        self.vision = VisionEncoder(cfg, weights, tp)
        self.llm = DecoderLM(cfg.llm, weights, tp)
        self.device = self.llm.device
        self.dtype = self.llm.dtype

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
             progress: bool = True, tp: TPGroup | None = None) -> "InternVLModel":
        """Load the checkpoint; with `tp` (size > 1) keep only this rank's shard on `device`."""
        model_dir = Path(model_dir)
        cfg = load_config(model_dir)
        weights = load_sharded_weights(model_dir, cfg, device, dtype, tp, progress=progress)
        return cls(cfg, weights, model_dir, tp)

    @property
    def tokens_per_tile(self) -> int:
        return self.cfg.image_tokens_per_tile


def load_sharded_weights(model_dir: str | os.PathLike, cfg: InternVLConfig, device: str = "cpu",
                         dtype: torch.dtype = torch.float32, tp: TPGroup | None = None,
                         components: tuple[str, ...] = ("vision", "llm"),
                         progress: bool = True, workers: int = 1) -> dict[str, torch.Tensor]:
    """`load_weights`, then (tp size > 1) this rank's shard (`parallel.load_for_rank`)."""
    return load_for_rank(lambda dev, prog: load_weights(model_dir, cfg, device=dev, dtype=dtype, progress=prog,
                                                        components=components, workers=workers),
                         cfg, device, tp, progress)
