"""LLaVA / LLaVA-NeXT safetensors → canonical tensors, from either naming.

llava-hf names (`vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`,
`language_model.model.*`, `language_model.lm_head.weight`) and transformers ≥ 4.52's
(`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`, `model.image_newline`,
`model.language_model.*`, `lm_head.weight`) map to:

    clip.cls [C]  clip.patch.weight [C, 3·P·P] (the bias-free Conv2d as a matmul)  clip.pos [N+1, C]
    clip.pre_norm.{weight,bias}
    clip.layers.{i}.{norm1,norm2}.{weight,bias}  .qkv.{weight,bias} (q, k, v fused)  .o.{weight,bias}
    clip.layers.{i}.{fc1,fc2}.{weight,bias}
    proj.{fc1,fc2}.{weight,bias}   newline [H] (NeXT)
    llm.*  as every family's LLM (models/llm): qkv and gate_up fused

Layers past the feature layer (and post_layernorm) are not read.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import torch

from ..checkpoint import load_mapped
from ..llm.weights import llm_shapes, map_llama_key
from .config import LlavaConfig

Transform = Callable[[torch.Tensor], torch.Tensor]
COMPONENTS = {"vision": ("clip.", "proj.", "newline"), "llm": ("llm.",)}


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _vector(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


_CLIP = {"self_attn.q_proj": ("qkv", 0), "self_attn.k_proj": ("qkv", 1), "self_attn.v_proj": ("qkv", 2),
         "self_attn.out_proj": ("o", 0), "layer_norm1": ("norm1", 0), "layer_norm2": ("norm2", 0),
         "mlp.fc1": ("fc1", 0), "mlp.fc2": ("fc2", 0)}
def map_key(key: str) -> tuple[str, int, Transform] | None:
    """Source key (either naming) → (canonical name, part, transform); None for keys we do not use."""
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return ("llm.lm_head.weight", 0, _identity)
    k = key.removeprefix("model.") if not key.startswith("model.language_model.") else key
    if k in ("image_newline",):
        return ("newline", 0, _vector)
    if k.startswith("vision_tower."):
        k = k[len("vision_tower."):].removeprefix("vision_model.")
        if k == "embeddings.class_embedding":
            return ("clip.cls", 0, _vector)
        if k == "embeddings.patch_embedding.weight":
            return ("clip.patch.weight", 0, _flatten)
        if k == "embeddings.position_embedding.weight":
            return ("clip.pos", 0, _identity)
        m = re.fullmatch(r"pre_layrnorm\.(weight|bias)", k)
        if m:
            return (f"clip.pre_norm.{m.group(1)}", 0, _identity)
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m.group(2) in _CLIP:
            name, part = _CLIP[m.group(2)]
            return (f"clip.layers.{m.group(1)}.{name}.{m.group(3)}", part, _identity)
        return None
    m = re.fullmatch(r"multi_modal_projector\.linear_([12])\.(weight|bias)", k)
    if m:
        return (f"proj.fc{m.group(1)}.{m.group(2)}", 0, _identity)
    for prefix in ("model.language_model.", "language_model.model."):
        if key.startswith(prefix):
            target = map_llama_key(key[len(prefix):])
            return None if target is None else (*target, _identity)
    return None


def expected_shapes(cfg: LlavaConfig) -> dict[str, tuple[int, ...]]:
    v, l = cfg.vision, cfg.llm
    c, h = v.width, l.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "clip.cls": (c,), "clip.patch.weight": (c, 3 * v.patch_size ** 2), "clip.pos": (v.grid ** 2 + 1, c),
        "clip.pre_norm.weight": (c,), "clip.pre_norm.bias": (c,)}
    for i in range(v.depth):
        b = f"clip.layers.{i}."
        for norm in ("norm1", "norm2"):
            shapes.update({f"{b}{norm}.weight": (c,), f"{b}{norm}.bias": (c,)})
        shapes.update({b + "qkv.weight": (3 * c, c), b + "qkv.bias": (3 * c,), b + "o.weight": (c, c),
                       b + "o.bias": (c,), b + "fc1.weight": (v.intermediate_size, c),
                       b + "fc1.bias": (v.intermediate_size,), b + "fc2.weight": (c, v.intermediate_size),
                       b + "fc2.bias": (c,)})
    shapes.update({"proj.fc1.weight": (h, v.out_width), "proj.fc2.weight": (h, h)})
    if cfg.projector_bias:
        shapes.update({"proj.fc1.bias": (h,), "proj.fc2.bias": (h,)})
    if cfg.image_newline:
        shapes["newline"] = (h,)
    shapes.update(llm_shapes(l))
    return shapes


def load_weights(model_dir: str | os.PathLike, cfg: LlavaConfig, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, progress: bool = True,
                 components: tuple[str, ...] = ("vision", "llm"), workers: int = 1) -> dict[str, torch.Tensor]:
    prefixes = tuple(p for c in components for p in COMPONENTS[c])
    depth = cfg.vision.depth

    def mapped(key: str):
        target = map_key(key)
        if target is not None and target[0].startswith("clip.layers."):
            if int(target[0].split(".")[2]) >= depth:
                return None
        return target

    return load_mapped(model_dir, mapped, expected_shapes(cfg), prefixes, device, dtype, progress, workers,
                       tied=cfg.llm.tie_word_embeddings)
