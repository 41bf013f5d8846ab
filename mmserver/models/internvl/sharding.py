"""Tensor-parallel rules of InternViT (Megatron style, as the LLM's in `models/parallel.py`):
qkv and fc1 are column-parallel, proj and fc2 row-parallel; mlp1 is replicated."""

from __future__ import annotations

import torch

from ..parallel import split_heads, take_cols, take_rows
from .config import InternVLConfig


def shard_vision_weights(weights: dict[str, torch.Tensor], cfg: InternVLConfig, rank: int,
                         size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of every `vit.layers.*` matmul (and q/k norm); all other tensors pass through."""
    if size == 1:
        return dict(weights)
    v = cfg.vision
    if v.num_heads % size:
        raise ValueError(f"tensor parallelism {size} needs the ViT's num_heads % tp == 0, "
                         f"got num_heads={v.num_heads}")
    if v.intermediate_size % size:
        raise ValueError(f"tensor parallelism {size} needs the ViT's intermediate_size % tp == 0, "
                         f"got intermediate_size={v.intermediate_size}")
    c = v.hidden_size
    cl = c // size  # local attention width: num_heads / tp heads of head_dim
    c0 = rank * cl
    il = v.intermediate_size // size
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if not name.startswith("vit.layers."):
            out[name] = t  # patch embed, cls, pos; mlp1 (and the LLM): passed through
            continue
        kind = name.split(".", 3)[3]
        if kind in ("qkv.weight", "qkv.bias"):
            out[name] = split_heads(t, (0, c, 2 * c), ((c0, cl),) * 3)
        elif kind in ("q_norm.weight", "k_norm.weight"):
            out[name] = take_rows(t, c0, cl)
        elif kind == "proj.weight":
            out[name] = take_cols(t, c0, cl)
        elif kind in ("fc1.weight", "fc1.bias"):
            out[name] = take_rows(t, rank * il, il)
        elif kind == "fc2.weight":
            out[name] = take_cols(t, rank * il, il)
        else:
            out[name] = t  # proj.bias / fc2.bias (added once after the all_reduce), norms, ls1, ls2
    return out
