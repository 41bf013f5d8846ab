"""InternViT encoder, pixel shuffle v2 and the `mlp1` projector: tiles → LLM embeddings."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ... import kernels
from ..family import VisionInput
from ..parallel import TPGroup
from .config import InternVLConfig
from .preprocess import normalize_pixels


def _norm(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, norm_type: str, eps: float) -> torch.Tensor:
    if norm_type == "rms_norm":
        return _rms(x, w[prefix + ".weight"], eps)
    return F.layer_norm(x, (x.shape[-1],), w[prefix + ".weight"], w[prefix + ".bias"], eps)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # InternViT-6B RMSNorm: statistics in float32, weight applied in the input dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rms_pair_tp(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
                 full_width: int, tp: TPGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """`_rms` of q and k whose last dim is sharded over ranks: the mean of squares must cover the
    FULL width, so the local sums of squares are summed over ranks (one all_reduce for both)."""
    qf, kf = q.float(), k.float()
    sq = torch.cat([qf.pow(2).sum(-1, keepdim=True), kf.pow(2).sum(-1, keepdim=True)], dim=-1)
    tp.all_reduce(sq)
    inv = torch.rsqrt(sq / full_width + eps)
    return wq * (qf * inv[..., :1]).to(q.dtype), wk * (kf * inv[..., 1:]).to(k.dtype)


def pixel_shuffle_v2(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """[N, h, w, C] → [N, h·r, w·r, C/r²]; each output token is the 2×2 block TL, TR, BL, BR."""
    n, h, w, c = x.shape
    x = x.view(n, h, int(w * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(w * ratio), int(h * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3).contiguous()


class VisionEncoder:
    """Runs tiles [N, 3, 448, 448] through InternViT and mlp1; returns [N, tokens, H_llm].

    With `tp`, `weights` are this rank's shard (see `sharding.py`): each rank
    runs num_heads / tp heads and 1 / tp of fc1; proj and fc2 outputs are summed over ranks.
    Every rank must call `encode` with the same tiles; all ranks get the full result.
    """

    def __init__(self, cfg: InternVLConfig, weights: dict[str, torch.Tensor], tp: TPGroup | None = None):
        self.cfg = cfg
        self.v = cfg.vision
        self.w = weights
        self.tp = tp if tp is not None and tp.size > 1 else None  # None: no collectives at all
        self.dtype = weights["vit.patch.weight"].dtype
        self.device = weights["vit.patch.weight"].device
        size = self.tp.size if self.tp else 1
        if self.v.num_heads % size:
            raise ValueError(f"tensor parallelism {size} needs the ViT's num_heads % tp == 0, "
                             f"got num_heads={self.v.num_heads}")
        self.num_heads = self.v.num_heads // size
        self.width = self.num_heads * self.v.head_dim  # local attention width
        rows = weights["vit.layers.0.qkv.weight"].shape[0]
        if rows != 3 * self.width:
            raise ValueError(f"ViT qkv weight has {rows} rows but tp={size} expects {3 * self.width}: "
                             "are the weights sharded for this tensor-parallel size?")

    @torch.inference_mode()
    def vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states [N, 1 + patches, C] (no final norm, as the original)."""
        v, w = self.v, self.w
        x = F.conv2d(pixel_values.to(self.device, self.dtype), w["vit.patch.weight"], w["vit.patch.bias"],
                     stride=v.patch_size)
        n = x.shape[0]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([w["vit.cls"].expand(n, -1, -1), x], dim=1) + w["vit.pos"]
        for i in range(v.num_layers):
            x = self._layer(x, f"vit.layers.{i}.")
        return x

    def _layer(self, x: torch.Tensor, p: str) -> torch.Tensor:
        v, w = self.v, self.w
        n, s, _ = x.shape
        h = _norm(x, w, p + "norm1", v.norm_type, v.norm_eps)
        qkv = F.linear(h, w[p + "qkv.weight"], w.get(p + "qkv.bias"))
        q, k, vv = qkv.split(self.width, dim=-1)
        if v.qk_norm:  # 6B style: RMSNorm over the full width, before the head split
            if self.tp:
                q, k = _rms_pair_tp(q, k, w[p + "q_norm.weight"], w[p + "k_norm.weight"], v.norm_eps,
                                    v.hidden_size, self.tp)
            else:
                q = _rms(q, w[p + "q_norm.weight"], v.norm_eps)
                k = _rms(k, w[p + "k_norm.weight"], v.norm_eps)
        heads = (n, s, self.num_heads, v.head_dim)
        q, k, vv = (t.reshape(heads).transpose(1, 2) for t in (q, k, vv))
        attn = kernels.vit_attention(q, k, vv, v.head_dim**-0.5)
        attn = attn.transpose(1, 2).reshape(n, s, self.width)
        x = x + w[p + "ls1"] * self._row_linear(attn, w[p + "proj.weight"], w[p + "proj.bias"])
        h = _norm(x, w, p + "norm2", v.norm_type, v.norm_eps)
        h = self._row_linear(F.gelu(F.linear(h, w[p + "fc1.weight"], w[p + "fc1.bias"])), w[p + "fc2.weight"],
                             w[p + "fc2.bias"])
        return x + w[p + "ls2"] * h

    def _row_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """A row-parallel linear: partial products summed over ranks, the bias added once, after."""
        if not self.tp:
            return F.linear(x, weight, bias)
        out = self.tp.all_reduce(F.linear(x, weight))
        return out.add_(bias)

    @torch.inference_mode()
    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drop CLS, pixel-shuffle and apply mlp1: [N, 1+P, C] → [N, P·r², H_llm]."""
        w = self.w
        x = hidden[:, 1:]
        n, p, c = x.shape
        side = int(p**0.5)
        x = pixel_shuffle_v2(x.reshape(n, side, side, c), self.cfg.downsample_ratio)
        x = x.reshape(n, -1, x.shape[-1])
        x = F.layer_norm(x, (x.shape[-1],), w["mlp1.norm.weight"], w["mlp1.norm.bias"], 1e-5)
        x = F.gelu(F.linear(x, w["mlp1.fc1.weight"], w["mlp1.fc1.bias"]))
        return F.linear(x, w["mlp1.fc2.weight"], w["mlp1.fc2.bias"])

    def prepare(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles on this encoder's device in its dtype: float pixel values as they are, raw uint8
        [N, H, W, 3] tiles normalised on the device first (a quarter of the bytes to copy)."""
        if tiles.dtype == torch.uint8:
            tiles = normalize_pixels(tiles.to(self.device, non_blocking=True))
        return tiles.to(self.device, self.dtype)

    def encode(self, pixel_values: torch.Tensor, max_batch: int = 64) -> torch.Tensor:
        """Tiles (float [N, 3, H, W] or uint8 [N, H, W, 3]) → [N, tokens_per_tile, H_llm], run in
        chunks of `max_batch` tiles."""
        pixel_values = self.prepare(pixel_values)
        outs = [self.project(self.vit(pixel_values[i:i + max_batch]))
                for i in range(0, pixel_values.shape[0], max_batch)]
        return torch.cat(outs, dim=0)

    def encode_images(self, inputs: Sequence[VisionInput]) -> list[torch.Tensor]:
        """Each image's embedding rows [tiles · tokens_per_tile, H_llm], in order; the tiles
        of all the images run as one batch (`encode`)."""
        if not inputs:
            return []
        feats = self.encode(torch.cat([x.pixels for x in inputs]))
        per_tile = feats.shape[1]
        rows = feats.reshape(-1, feats.shape[-1])
        return list(rows.split([x.pixels.shape[0] * per_tile for x in inputs]))
