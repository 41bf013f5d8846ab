"""Read InternVL safetensors shards (either layout) into one canonical set of tensors.

Canonical names are what our model code uses; q/k/v and gate/up are fused so each layer
runs one matmul per projection. Every source key maps to (canonical name, part index,
transform); parts are concatenated along dim 0 in index order.

    vit.cls [1,1,C]  vit.patch.{weight,bias}  vit.pos [1,N+1,C]
    vit.layers.{i}.{qkv,proj,fc1,fc2,norm1,norm2}.{weight,bias}  .q_norm.weight .k_norm.weight .ls1 .ls2
    mlp1.{norm,fc1,fc2}.{weight,bias}
    llm.embed.weight  llm.norm.weight  llm.lm_head.weight
    llm.layers.{i}.{qkv.weight,qkv.bias,o.weight,gate_up.weight,down.weight,norm1.weight,norm2.weight}
"""

from __future__ import annotations

import os
import re
from typing import Callable

import torch

from ..checkpoint import WeightError, load_mapped
from ..llm.weights import LLAMA_LAYER, llm_shapes
from ..llm.config import LLMConfig
from .config import InternVLConfig

Transform = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------
# Name mapping


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


_VIT_ORIGINAL = {
    "attn.qkv": "qkv", "attn.proj": "proj", "attn.q_norm": "q_norm", "attn.k_norm": "k_norm",
    "mlp.fc1": "fc1", "mlp.fc2": "fc2", "norm1": "norm1", "norm2": "norm2",
}
_VIT_HF = {
    "attention.projection_layer": "proj", "attention.q_norm": "q_norm", "attention.k_norm": "k_norm",
    "mlp.fc1": "fc1", "mlp.fc2": "fc2", "layernorm_before": "norm1", "layernorm_after": "norm2",
}
_LLM_LAYER = {
    **LLAMA_LAYER,  # llama / qwen2 names
    # internlm2 names
    "attention.wo": ("o", 0), "feed_forward.w1": ("gate_up", 0), "feed_forward.w3": ("gate_up", 1),
    "feed_forward.w2": ("down", 0), "attention_norm": ("norm1", 0), "ffn_norm": ("norm2", 0),
    "attention.wqkv": ("qkv", 0),
}


def ungroup_internlm2_wqkv(w: torch.Tensor, llm: LLMConfig) -> torch.Tensor:
    """InternLM2 stores wqkv grouped per KV head ([q_0..q_{g-1}, k, v] × kv); reorder to [q; k; v]."""
    kv, d = llm.num_kv_heads, llm.head_dim
    g = llm.num_heads // kv
    expected = (kv * (g + 2) * d, llm.hidden_size)
    if tuple(w.shape) != expected:
        raise WeightError(f"attention.wqkv has shape {tuple(w.shape)}, expected {expected}")
    grouped = w.view(kv, g + 2, d, -1)
    q = grouped[:, :g].reshape(kv * g * d, -1)
    k = grouped[:, g].reshape(kv * d, -1)
    v = grouped[:, g + 1].reshape(kv * d, -1)
    return torch.cat([q, k, v], dim=0)


def map_key(key: str, cfg: InternVLConfig) -> tuple[str, int, Transform] | None:
    """Source key → (canonical name, part, transform); None for keys we do not use."""
    k = key
    for prefix in ("model.", ""):
        if k.startswith(prefix + "vision_model.") or k.startswith(prefix + "vision_tower."):
            return _map_vit(k.split(".", 2 if prefix else 1)[-1])
    if k.startswith("mlp1.") or k.startswith("multi_modal_projector.") or k.startswith("model.multi_modal_projector."):
        return _map_projector(k)
    if k in ("lm_head.weight", "language_model.lm_head.weight", "language_model.output.weight"):
        return ("llm.lm_head.weight", 0, _identity)
    for prefix in ("language_model.model.", "model.language_model.", "language_model."):
        if k.startswith(prefix):
            return _map_llm(k[len(prefix):], cfg)
    return None


def _map_vit(k: str) -> tuple[str, int, Transform] | None:
    fixed = {
        "embeddings.class_embedding": "vit.cls", "embeddings.cls_token": "vit.cls",
        "embeddings.position_embedding": "vit.pos", "embeddings.position_embeddings": "vit.pos",
        "embeddings.patch_embedding.weight": "vit.patch.weight",
        "embeddings.patch_embedding.bias": "vit.patch.bias",
        "embeddings.patch_embeddings.projection.weight": "vit.patch.weight",
        "embeddings.patch_embeddings.projection.bias": "vit.patch.bias",
    }
    if k in fixed:
        return (fixed[k], 0, _identity)
    m = re.fullmatch(r"encoder\.(?:layers|layer)\.(\d+)\.(.+)", k)
    if not m:
        return None
    i, rest = m.group(1), m.group(2)
    base = f"vit.layers.{i}."
    if rest in ("ls1", "lambda_1"):
        return (base + "ls1", 0, _identity)
    if rest in ("ls2", "lambda_2"):
        return (base + "ls2", 0, _identity)
    mod, _, param = rest.rpartition(".")
    for table in (_VIT_ORIGINAL, _VIT_HF):
        if mod in table:
            return (f"{base}{table[mod]}.{param}", 0, _identity)
    qkv = {"attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
    if mod in qkv:
        return (f"{base}qkv.{param}", qkv[mod], _identity)
    return None


def _map_projector(k: str) -> tuple[str, int, Transform] | None:
    k = k.removeprefix("model.")
    names = {"mlp1.0": "norm", "mlp1.1": "fc1", "mlp1.3": "fc2",
             "multi_modal_projector.layer_norm": "norm", "multi_modal_projector.linear_1": "fc1",
             "multi_modal_projector.linear_2": "fc2"}
    mod, _, param = k.rpartition(".")
    return (f"mlp1.{names[mod]}.{param}", 0, _identity) if mod in names else None


def _map_llm(k: str, cfg: InternVLConfig) -> tuple[str, int, Transform] | None:
    if k in ("embed_tokens.weight", "tok_embeddings.weight", "model.embed_tokens.weight", "model.tok_embeddings.weight"):
        return ("llm.embed.weight", 0, _identity)
    if k in ("norm.weight", "model.norm.weight"):
        return ("llm.norm.weight", 0, _identity)
    if k in ("lm_head.weight", "output.weight"):
        return ("llm.lm_head.weight", 0, _identity)
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.(.+)\.(weight|bias)", k)
    if not m:
        return None
    i, mod, param = m.groups()
    if mod not in _LLM_LAYER:
        return None
    name, part = _LLM_LAYER[mod]
    transform: Transform = _identity
    if mod == "attention.wqkv":
        transform = lambda t: ungroup_internlm2_wqkv(t, cfg.llm)  # noqa: E731
    return (f"llm.layers.{i}.{name}.{param}", part, transform)


# ---------------------------------------------------------------------------------------
# Expected shapes


def expected_shapes(cfg: InternVLConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor the model needs, with its shape (after fusing)."""
    v, l = cfg.vision, cfg.llm
    c = v.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "vit.cls": (1, 1, c),
        "vit.patch.weight": (c, v.num_channels, v.patch_size, v.patch_size),
        "vit.patch.bias": (c,),
        "vit.pos": (1, v.num_patches + 1, c),
    }
    for i in range(v.num_layers):
        b = f"vit.layers.{i}."
        shapes.update({b + "qkv.weight": (3 * c, c), b + "proj.weight": (c, c), b + "proj.bias": (c,),
                       b + "fc1.weight": (v.intermediate_size, c), b + "fc1.bias": (v.intermediate_size,),
                       b + "fc2.weight": (c, v.intermediate_size), b + "fc2.bias": (c,),
                       b + "norm1.weight": (c,), b + "norm2.weight": (c,), b + "ls1": (c,), b + "ls2": (c,)})
        if v.qkv_bias:
            shapes[b + "qkv.bias"] = (3 * c,)
        if v.qk_norm:
            shapes[b + "q_norm.weight"] = (c,)
            shapes[b + "k_norm.weight"] = (c,)
        if v.norm_type == "layer_norm":
            shapes[b + "norm1.bias"] = (c,)
            shapes[b + "norm2.bias"] = (c,)
    ps = int(round(1 / cfg.downsample_ratio)) ** 2 * c
    h = l.hidden_size
    shapes.update({"mlp1.norm.weight": (ps,), "mlp1.norm.bias": (ps,), "mlp1.fc1.weight": (h, ps),
                   "mlp1.fc1.bias": (h,), "mlp1.fc2.weight": (h, h), "mlp1.fc2.bias": (h,)})
    shapes.update(llm_shapes(l))
    return shapes


# ---------------------------------------------------------------------------------------
# Loading


COMPONENTS = {"vision": ("vit.", "mlp1."), "llm": ("llm.",)}


def load_weights(model_dir: str | os.PathLike, cfg: InternVLConfig, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, progress: bool = True,
                 components: tuple[str, ...] = ("vision", "llm"), workers: int = 1) -> dict[str, torch.Tensor]:
    """Load all shards, fuse parts and check every tensor against `expected_shapes`.

    `components` limits loading to the vision encoder or the LLM, so a process holds
    only the part it runs; `workers` threads read shards (LOADWORKER, via the caller).
    """
    prefixes = tuple(p for c in components for p in COMPONENTS[c])
    return load_mapped(model_dir, lambda key: map_key(key, cfg), expected_shapes(cfg), prefixes, device, dtype,
                       progress, workers, tied=cfg.llm.tie_word_embeddings)
