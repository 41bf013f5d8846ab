"""Qwen2-VL / Qwen2.5-VL safetensors → canonical tensors, from either naming.

Hub names (`visual.*`, `model.layers.*`, `lm_head.weight`) and the newer ones some fine-tunes
were saved with (`model.visual.*`, `model.language_model.*`) map to the same canonical set:

    vit.patch.weight [C, 3·2·14·14]  (the bias-free Conv3d as a matmul)
    vit.blocks.{i}.{norm1,norm2}.{weight,bias}   (Qwen2.5-VL: RMSNorm, weight only)
    vit.blocks.{i}.{qkv,proj}.{weight,bias}
    vit.blocks.{i}.{fc1,fc2}.{weight,bias}        (Qwen2-VL)
    vit.blocks.{i}.{gate_up,down}.{weight,bias}   (Qwen2.5-VL: gate and up fused)
    merger.norm.{weight,bias}  merger.{fc1,fc2}.{weight,bias}
    llm.*  as every family's LLM (models/llm): qkv and gate_up fused
"""

from __future__ import annotations

import os
import re
from typing import Callable

import torch

from ..checkpoint import load_mapped
from ..llm.weights import llm_shapes, map_llama_key
from .config import QwenVLConfig

Transform = Callable[[torch.Tensor], torch.Tensor]
COMPONENTS = {"vision": ("vit.", "merger."), "llm": ("llm.",)}


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _flatten_patch(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


_VIT = {"norm1": ("norm1", 0), "norm2": ("norm2", 0), "attn.qkv": ("qkv", 0), "attn.proj": ("proj", 0),
        "mlp.fc1": ("fc1", 0), "mlp.fc2": ("fc2", 0), "mlp.gate_proj": ("gate_up", 0), "mlp.up_proj": ("gate_up", 1),
        "mlp.down_proj": ("down", 0)}
_MERGER = {"ln_q": "norm", "mlp.0": "fc1", "mlp.2": "fc2"}
def map_key(key: str) -> tuple[str, int, Transform] | None:
    """Source key (either naming) → (canonical name, part, transform); None for keys we do not use."""
    k = key.removeprefix("model.") if key.startswith("model.visual.") else key
    if k.startswith("visual."):
        k = k[len("visual."):]
        if k == "patch_embed.proj.weight":
            return ("vit.patch.weight", 0, _flatten_patch)
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m.group(2) in _VIT:
            name, part = _VIT[m.group(2)]
            return (f"vit.blocks.{m.group(1)}.{name}.{m.group(3)}", part, _identity)
        m = re.fullmatch(r"merger\.(.+)\.(weight|bias)", k)
        if m and m.group(1) in _MERGER:
            return (f"merger.{_MERGER[m.group(1)]}.{m.group(2)}", 0, _identity)
        return None
    if k == "lm_head.weight":
        return ("llm.lm_head.weight", 0, _identity)
    for prefix in ("model.language_model.", "model."):
        if k.startswith(prefix):
            target = map_llama_key(k[len(prefix):])
            return None if target is None else (*target, _identity)
    return None


def expected_shapes(cfg: QwenVLConfig) -> dict[str, tuple[int, ...]]:
    v, l = cfg.vision, cfg.llm
    c, i4 = v.width, 4 * v.width
    shapes: dict[str, tuple[int, ...]] = {"vit.patch.weight": (c, v.patch_dim)}
    for i in range(v.depth):
        b = f"vit.blocks.{i}."
        shapes.update({b + "norm1.weight": (c,), b + "norm2.weight": (c,), b + "qkv.weight": (3 * c, c),
                       b + "qkv.bias": (3 * c,), b + "proj.weight": (c, c), b + "proj.bias": (c,)})
        if not v.rms_norm:
            shapes.update({b + "norm1.bias": (c,), b + "norm2.bias": (c,)})
        if v.kind == "qwen2_vl":
            shapes.update({b + "fc1.weight": (v.intermediate_size, c), b + "fc1.bias": (v.intermediate_size,),
                           b + "fc2.weight": (c, v.intermediate_size), b + "fc2.bias": (c,)})
        else:
            shapes.update({b + "gate_up.weight": (2 * v.intermediate_size, c),
                           b + "gate_up.bias": (2 * v.intermediate_size,),
                           b + "down.weight": (c, v.intermediate_size), b + "down.bias": (c,)})
    shapes.update({"merger.norm.weight": (c,), "merger.fc1.weight": (i4, i4), "merger.fc1.bias": (i4,),
                   "merger.fc2.weight": (v.out_hidden_size, i4), "merger.fc2.bias": (v.out_hidden_size,)})
    if not v.rms_norm:
        shapes["merger.norm.bias"] = (c,)
    shapes.update(llm_shapes(l))
    return shapes


def load_weights(model_dir: str | os.PathLike, cfg: QwenVLConfig, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, progress: bool = True,
                 components: tuple[str, ...] = ("vision", "llm"), workers: int = 1) -> dict[str, torch.Tensor]:
    prefixes = tuple(p for c in components for p in COMPONENTS[c])
    return load_mapped(model_dir, map_key, expected_shapes(cfg), prefixes, device, dtype, progress, workers,
                       tied=cfg.llm.tie_word_embeddings)
