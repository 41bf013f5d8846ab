"""The Qwen2-VL and Qwen2.5-VL vision towers: a list of variable-size images → LLM embeddings.

All images of a call run as ONE packed sequence of patch rows: attention stays within each
image (Qwen2-VL, and Qwen2.5-VL's full-attention blocks) or within each 4×4-merged-token
window (Qwen2.5-VL's other blocks), given to `kernels.varlen_attention` as segment offsets.
A video (grid t > 1) is t such slices: each temporal patch attends (and is windowed) on its
own, as in transformers; the 2-D rotary repeats per slice.

    patch embed (bias-free Conv3d as a matmul) → blocks → PatchMerger (4 rows → 1 token)
    Qwen2-VL block:   x += proj(attn(LN1 x));  x += fc2(act(fc1(LN2 x)))       act: quick_gelu
    Qwen2.5-VL block: x += proj(attn(RMS1 x)); x += down(silu(gate y) · up y), y = RMS2 x
    attention: qkv with bias, 2-D rotary (rows: head_dim/4 frequencies, cols: the next ones),
               non-causal, scale head_dim^-0.5

Qwen2.5-VL reorders the rows window by window (in units of one merged token's 4 rows) before
block 0 and restores raster order after the merger, as transformers does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ... import kernels
from ..family import VisionInput
from ..parallel import TPGroup
from .config import QwenVLConfig
from .preprocess import patchify, patchify_video


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return (lambda x: F.gelu(x, approximate="tanh")) if name != "gelu" else F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"vision hidden_act {name!r} is not supported")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[N, heads, D] rotated in float32 (transformers' apply_rotary_pos_emb_vision), back to x's dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def vision_positions(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """(row, col) of each patch row of one image, [t·h·w, 2], in the block-major row order."""
    t, h, w = grid
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hpos, wpos], axis=1), (t, 1))


def window_index(grids: Sequence[tuple[int, int, int]], merge: int, window: int) -> tuple[np.ndarray, list[int]]:
    """Qwen2.5-VL's window order: the merged-token indices window by window (windows in raster
    order, partial ones at the right and bottom edges, tokens in raster order inside), and the
    patch-row offsets of the windows (`get_vision_window_index`, empty windows dropped)."""
    order, cu, base = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        for tt in range(t):
            for y in range(0, gh, window):
                for x in range(0, gw, window):
                    win = idx[tt, y:y + window, x:x + window].reshape(-1)
                    order.append(win + base)
                    cu.append(cu[-1] + win.size * merge * merge)
        base += t * gh * gw
    return np.concatenate(order), cu


class QwenVisionEncoder:
    """With `tp`, `weights` are this rank's shard (see `sharding.py`): each rank runs
    num_heads / tp heads and 1 / tp of the MLP; proj and fc2 / down are summed over ranks.
    Every rank must be called with the same inputs; all get the full result."""

    def __init__(self, cfg: QwenVLConfig, weights: dict[str, torch.Tensor], tp: TPGroup | None = None):
        self.cfg = cfg
        self.v = v = cfg.vision
        self.w = weights
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.dtype = weights["vit.patch.weight"].dtype
        self.device = weights["vit.patch.weight"].device
        size = self.tp.size if self.tp else 1
        if v.num_heads % size:
            raise ValueError(f"tensor parallelism {size} needs the ViT's num_heads % tp == 0, got {v.num_heads}")
        self.num_heads = v.num_heads // size
        self.width = self.num_heads * v.head_dim
        rows = weights["vit.blocks.0.qkv.weight"].shape[0]
        if rows != 3 * self.width:
            raise ValueError(f"ViT qkv weight has {rows} rows but tp={size} expects {3 * self.width}: "
                             "are the weights sharded for this tensor-parallel size?")
        self.act = _act(v.hidden_act)
        quarter = v.head_dim // 2
        self.inv_freq = (1.0 / (v.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))).to(
            self.device)

    # ----------------------------------------------------------------- inputs

    def prepare(self, x: VisionInput) -> torch.Tensor:
        """One image's (video's) patch rows [t·h·w, 1176] on the device in the encoder's dtype:
        given (float, the processor's values) or made on the device from the resized uint8
        image [H', W', 3] (video: frames [F, H', W', 3])."""
        pixels = x.pixels
        if pixels.dtype == torch.uint8:
            v = self.v
            fn = patchify_video if pixels.dim() == 4 else patchify
            pixels = fn(pixels.to(self.device, non_blocking=True), self.cfg.image_mean, self.cfg.image_std,
                        v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
        return pixels.to(self.device, self.dtype)

    def encode_images(self, inputs: Sequence[VisionInput]) -> list[torch.Tensor]:
        """Each image's rows [t·h·w / 4, LLM hidden], in order; all images in one packed pass."""
        if not inputs:
            return []
        grids = []
        for x in inputs:
            if len(x.grid) != 3:
                raise ValueError("a Qwen2-VL vision input needs its grid (t, h, w)")
            grids.append(tuple(int(g) for g in x.grid))
        out = self.forward(torch.cat([self.prepare(x) for x in inputs]), grids)
        m2 = self.v.spatial_merge_size ** 2
        return list(out.split([t * h * w // m2 for t, h, w in grids]))

    # ----------------------------------------------------------------- the tower

    @torch.inference_mode()
    def forward(self, patches: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Patch rows [Σ t·h·w, 1176] of the images `grids` → merged tokens [Σ t·h·w/4, hidden]."""
        v, w, dev = self.v, self.w, self.device
        n = patches.shape[0]
        if n != sum(t * h * wd for t, h, wd in grids):
            raise ValueError(f"{n} patch rows for grids {list(grids)}")
        m, unit = v.spatial_merge_size, v.spatial_merge_size ** 2
        x = F.linear(patches.to(dev, self.dtype), w["vit.patch.weight"])
        pos = torch.from_numpy(np.concatenate([vision_positions(g, m) for g in grids])).to(dev)
        freqs = (pos[..., None].float() * self.inv_freq).reshape(n, -1)  # [N, D/2]: rows' then cols' freqs
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        # per image, per temporal slice
        lengths = [h * wd for t, h, wd in grids for _ in range(t)]
        cu_full = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32, device=dev)
        segments = {"full": (cu_full, max(lengths))}
        order = None
        if v.window:
            win, cu_win = window_index(grids, m, v.window)
            order = torch.from_numpy(win).to(dev)
            cu = np.unique(np.asarray(cu_win))
            segments["window"] = (torch.tensor(cu, dtype=torch.int32, device=dev), int(np.diff(cu).max()))
            x = x.view(-1, unit, x.shape[-1])[order].reshape(n, -1)
            cos = cos.view(-1, unit, *cos.shape[1:])[order].reshape(cos.shape)
            sin = sin.view(-1, unit, *sin.shape[1:])[order].reshape(sin.shape)
        for i in range(v.depth):
            full = not v.window or i in v.fullatt_block_indexes
            x = self._block(x, f"vit.blocks.{i}.", cos, sin, *segments["full" if full else "window"])
        out = self._merger(x)
        if order is not None:
            out = out[torch.argsort(order)]
        return out

    def _norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self.w
        if self.v.rms_norm:
            return kernels.rms_norm(x, w[prefix + ".weight"], self.v.norm_eps)
        return F.layer_norm(x, (x.shape[-1],), w[prefix + ".weight"], w[prefix + ".bias"], self.v.norm_eps)

    def _block(self, x: torch.Tensor, p: str, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:
        v, w = self.v, self.w
        n = x.shape[0]
        qkv = F.linear(self._norm(x, p + "norm1"), w[p + "qkv.weight"], w[p + "qkv.bias"])
        q, k, vv = qkv.view(n, 3, self.num_heads, v.head_dim).unbind(1)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        o = kernels.varlen_attention(q.contiguous(), k.contiguous(), vv.contiguous(), cu_seqlens, max_seqlen,
                                     v.head_dim ** -0.5)
        x = x + self._row_linear(o.reshape(n, self.width), w[p + "proj.weight"], w[p + "proj.bias"])
        h = self._norm(x, p + "norm2")
        if v.kind == "qwen2_vl":
            h = self._row_linear(self.act(F.linear(h, w[p + "fc1.weight"], w[p + "fc1.bias"])), w[p + "fc2.weight"],
                                 w[p + "fc2.bias"])
        else:
            gate, up = F.linear(h, w[p + "gate_up.weight"], w[p + "gate_up.bias"]).chunk(2, dim=-1)
            h = self._row_linear(self.act(gate) * up, w[p + "down.weight"], w[p + "down.bias"])
        return x + h

    def _row_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if not self.tp:
            return F.linear(x, weight, bias)
        return self.tp.all_reduce(F.linear(x, weight)).add_(bias)

    def _merger(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        y = self._norm(x, "merger.norm").reshape(-1, 4 * self.v.width)
        y = F.gelu(F.linear(y, w["merger.fc1.weight"], w["merger.fc1.bias"]))
        return F.linear(y, w["merger.fc2.weight"], w["merger.fc2.bias"])
