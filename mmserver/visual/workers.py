"""Where the ViT runs: in the visual server's own process (one worker), or in
`visual_dp` worker groups of `visual_tp` ranks each."""

from __future__ import annotations

import torch

from ..models.internvl.vision import VisionEncoder


class EncoderPool:
    """One in-process encoder; the interface the visual server uses for any layout."""

    def __init__(self, encoder: VisionEncoder, tokens_per_tile: int, max_tiles: int = 64):
        self.encoder = encoder
        self.tokens_per_tile = tokens_per_tile
        self.max_tiles = max_tiles

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(tiles, max_batch=self.max_tiles)
