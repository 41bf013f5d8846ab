"""Tensor-parallel rules of the Qwen2-VL / Qwen2.5-VL ViT (Megatron style, as the LLM's in
`models/parallel.py`): qkv, fc1 and gate_up column-parallel (by heads / MLP columns), proj,
fc2 and down row-parallel; the patch embedding and the merger are replicated."""

from __future__ import annotations

import torch

from ..parallel import split_heads, take_cols, take_rows
from .config import VisionConfig


def shard_vision_weights(weights: dict[str, torch.Tensor], v: VisionConfig, rank: int,
                         size: int) -> dict[str, torch.Tensor]:
    if size == 1:
        return dict(weights)
    if v.num_heads % size or v.intermediate_size % size:
        raise ValueError(f"tensor parallelism {size} needs the ViT's num_heads ({v.num_heads}) and "
                         f"intermediate_size ({v.intermediate_size}) divisible by it")
    c = v.width
    cl = c // size
    c0 = rank * cl
    i, il = v.intermediate_size, v.intermediate_size // size
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if not name.startswith("vit.blocks."):
            out[name] = t
            continue
        kind = name.split(".", 3)[3]
        if kind in ("qkv.weight", "qkv.bias"):
            out[name] = split_heads(t, (0, c, 2 * c), ((c0, cl),) * 3)
        elif kind == "proj.weight":
            out[name] = take_cols(t, c0, cl)
        elif kind in ("fc1.weight", "fc1.bias"):
            out[name] = take_rows(t, rank * il, il)
        elif kind in ("gate_up.weight", "gate_up.bias"):  # keep [gate_r; up_r]
            out[name] = split_heads(t, (0, i), ((rank * il, il), (rank * il, il)))
        elif kind in ("fc2.weight", "down.weight"):
            out[name] = take_cols(t, rank * il, il)
        else:
            out[name] = t  # norms; proj / fc2 / down biases (added once, after the all_reduce)
    return out
