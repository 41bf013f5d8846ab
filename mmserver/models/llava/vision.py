"""The CLIP vision tower, the LLaVA projector and LLaVA-NeXT's feature packing.

    tile [3, 336, 336] → patch embed (bias-free conv as a matmul) → [CLS; patches] + positions
    → pre-LN → layers (pre-LN: x += o(attn(LN1 x)); x += fc2(quick_gelu(fc1(LN2 x))))
    → hidden_states[vision_feature_layer] (−2: the tower runs all but its last layer)
    → CLS dropped ("default") → projector fc2(gelu(fc1 ·)) → [576, LLM hidden]

LLaVA-NeXT: an image's tiles (base first) run as one batch; the base tile's rows come first,
then the other tiles' rows arranged as one (rows × cols) grid, the padding rows / columns cut
(`unpad`), and `image_newline` appended to each row. The tower and the projector are
replicated under tensor parallelism (small next to the LLM), so every rank computes the same rows.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ... import kernels
from ..family import VisionInput
from ..parallel import TPGroup
from .config import LLAVA_NEXT, LlavaConfig
from .preprocess import normalize, select_best_resolution, unpadded_grid


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    raise ValueError(f"activation {name!r} is not supported")


class LlavaVisionEncoder:
    """Every rank holds the whole tower (`tp` is accepted for the interface; no collectives)."""

    def __init__(self, cfg: LlavaConfig, weights: dict[str, torch.Tensor], tp: TPGroup | None = None):
        self.cfg = cfg
        self.v = cfg.vision
        self.w = weights
        self.dtype = weights["clip.patch.weight"].dtype
        self.device = weights["clip.patch.weight"].device
        self.act = _act(self.v.hidden_act)
        self.proj_act = _act(cfg.projector_act)

    def prepare(self, x: VisionInput) -> torch.Tensor:
        """One image's tiles [n, 3, S, S] on the device in the encoder's dtype."""
        pixels = x.pixels
        if pixels.dtype == torch.uint8:
            pixels = normalize(pixels.to(self.device, non_blocking=True), self.cfg)
        return pixels.to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_images(self, inputs: Sequence[VisionInput]) -> list[torch.Tensor]:
        """Each image's rows [n_tokens, LLM hidden], in order; all tiles of the call in one batch."""
        if not inputs:
            return []
        tiles = [self.prepare(x) for x in inputs]
        feats = self.project(self.tower(torch.cat(tiles)))
        out, start = [], 0
        for x, t in zip(inputs, tiles):
            f = feats[start:start + t.shape[0]]
            start += t.shape[0]
            out.append(self.pack(f, x.grid) if self.cfg.kind == LLAVA_NEXT else f[0])
        return out

    def tower(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles [n, 3, S, S] → the selected features [n, tokens, C · len(feature_layers)]."""
        v, w = self.v, self.w
        n, p, g = pixels.shape[0], v.patch_size, v.grid
        patches = pixels.reshape(n, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3 * p * p)
        x = F.linear(patches, w["clip.patch.weight"])
        x = torch.cat([w["clip.cls"].expand(n, 1, -1), x], dim=1) + w["clip.pos"]
        x = F.layer_norm(x, (v.width,), w["clip.pre_norm.weight"], w["clip.pre_norm.bias"], v.norm_eps)
        states = {0: x}
        for i in range(v.depth):
            x = self._layer(x, f"clip.layers.{i}.")
            states[i + 1] = x
        out = torch.cat([states[i] for i in v.feature_layers], dim=-1)
        return out[:, 1:] if self.cfg.select_strategy == "default" else out

    def _layer(self, x: torch.Tensor, p: str) -> torch.Tensor:
        v, w = self.v, self.w
        n, s, c = x.shape
        h = F.layer_norm(x, (c,), w[p + "norm1.weight"], w[p + "norm1.bias"], v.norm_eps)
        qkv = F.linear(h, w[p + "qkv.weight"], w[p + "qkv.bias"]).view(n, s, 3, v.num_heads, v.head_dim)
        q, k, vv = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [n, heads, s, d]
        o = kernels.vit_attention(q.contiguous(), k.contiguous(), vv.contiguous(), v.head_dim ** -0.5)
        x = x + F.linear(o.transpose(1, 2).reshape(n, s, c), w[p + "o.weight"], w[p + "o.bias"])
        h = F.layer_norm(x, (c,), w[p + "norm2.weight"], w[p + "norm2.bias"], v.norm_eps)
        h = F.linear(self.act(F.linear(h, w[p + "fc1.weight"], w[p + "fc1.bias"])), w[p + "fc2.weight"],
                     w[p + "fc2.bias"])
        return x + h

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        w = self.w
        h = self.proj_act(F.linear(feats, w["proj.fc1.weight"], w.get("proj.fc1.bias")))
        return F.linear(h, w["proj.fc2.weight"], w.get("proj.fc2.bias"))

    def pack(self, feats: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """LLaVA-NeXT: one image's projected tiles [1 + rows·cols, 576, H] → its rows, as
        transformers' `pack_image_features` (grid from the image's (h, w))."""
        if len(size) != 2:
            raise ValueError("a LLaVA-NeXT vision input needs the image's (height, width) as its grid")
        height, width = (int(s) for s in size)
        side, g = self.v.image_size, self.v.grid
        bh, bw = select_best_resolution(height, width, self.cfg.pinpoints)
        nh, nw = bh // side, bw // side
        if feats.shape[0] != 1 + nh * nw or feats.shape[1] != g * g:
            raise ValueError(f"{feats.shape[0]} tiles of {feats.shape[1]} rows for a {width}x{height} image "
                             f"(expected 1 + {nh}x{nw} tiles of {g * g})")
        hidden = feats.shape[-1]
        grid = feats[1:].view(nh, nw, g, g, hidden).permute(0, 2, 1, 3, 4).reshape(nh * g, nw * g, hidden)
        rows, cols, off = unpadded_grid(height, width, nh * g, nw * g)
        grid = grid[off:off + rows] if rows != nh * g else grid[:, off:off + cols]
        if self.cfg.image_newline:
            grid = torch.cat([grid, self.w["newline"].to(grid.dtype).expand(rows, 1, hidden)], dim=1)
        return torch.cat([feats[0], grid.reshape(-1, hidden)])
