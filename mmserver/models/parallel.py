"""Tensor parallelism for the model code (Megatron style): the process group and weight sharding.

Each rank holds a slice of every large matmul and the activations between layers stay
replicated: column-parallel layers (LLM qkv, gate_up) split output rows, row-parallel
layers (LLM o, down) split input columns and are followed by one all_reduce. Embedding,
norms and lm_head are replicated: they are small next to the layers, and replicating them
keeps every rank's logits identical with no extra collective (at the cost of vocab×hidden
memory on every rank). The LLM rules are shared; a vision encoder's rules belong to its
family (e.g. `models/internvl/sharding.py`), built from the slicing helpers here.

Only all_reduce and broadcast are used, so gloo (CPU) and NCCL (GPU) both work.
How rank 0's engine drives the other ranks lives in `mmserver.engine.tp`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from .llm.config import LLMConfig


@dataclass
class TPGroup:
    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns `t`."""
        if self.size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` on every rank with rank `src`'s `t` (same shape and dtype everywhere)."""
        if self.size > 1:
            dist.broadcast(t, src=src, group=self.group)
        return t


def init_tp(rank: int, size: int, init_method: str, backend: str = "auto", group_name: str = "",
            timeout_s: float = 600.0) -> TPGroup:
    """Join the TP process group; call once in each rank's process (e.g. a spawned child).

    `init_method` is shared by all ranks: "tcp://127.0.0.1:PORT" or "file:///path" (the file
    must not exist before the first rank starts). backend "auto" picks nccl when CUDA is
    available and gloo otherwise; with nccl the rank uses GPU `rank % device_count()`, so
    load the model on `f"cuda:{torch.cuda.current_device()}"`.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad tensor-parallel rank {rank} for size {size}")
    if size == 1:
        return TPGroup(0, 1, None)  # no process group: single-rank code paths stay collective-free
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process; init_tp owns the "
                           "default process group (one process per rank)")
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=size,
                            group_name=group_name, timeout=datetime.timedelta(seconds=timeout_s))
    return TPGroup(rank, size, dist.group.WORLD)


def destroy_tp(tp: TPGroup | None) -> None:
    if tp is not None and tp.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Sharding


def local_kv_heads(num_heads: int, num_kv_heads: int, size: int) -> int:
    """KV heads one rank holds; with fewer KV heads than ranks each rank keeps the one its q heads use."""
    if num_heads % size:
        raise ValueError(f"tensor parallelism {size} needs num_heads % tp == 0, got num_heads={num_heads}")
    if num_kv_heads % size == 0:
        return num_kv_heads // size
    if size % num_kv_heads == 0:
        return 1
    raise ValueError(f"tensor parallelism {size} needs num_kv_heads % tp == 0 or tp % num_kv_heads == 0, "
                     f"got num_kv_heads={num_kv_heads}")


def take_rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    # clone: a view would keep the whole unsharded tensor alive
    return t[start:start + n].clone()


def take_cols(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    return t[:, start:start + n].contiguous()


def split_heads(t: torch.Tensor, offsets: tuple[int, ...], picks: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Concatenate rows t[offsets[i] + a : offsets[i] + a + n] for each (a, n) in picks (dim 0)."""
    return torch.cat([t[o + a:o + a + n] for o, (a, n) in zip(offsets, picks)], dim=0).clone()


def shard_llm_weights(weights: dict[str, torch.Tensor], cfg: LLMConfig, rank: int,
                      size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of every `llm.layers.*` matmul; all other tensors are passed through."""
    if size == 1:
        return dict(weights)
    d = cfg.head_dim
    kvl = local_kv_heads(cfg.num_heads, cfg.num_kv_heads, size)  # also checks num_heads % tp
    hl = cfg.num_heads // size
    if cfg.intermediate_size % size:
        raise ValueError(f"tensor parallelism {size} needs intermediate_size % tp == 0, "
                         f"got intermediate_size={cfg.intermediate_size}")
    il = cfg.intermediate_size // size
    q0 = rank * hl
    # KV heads: a contiguous block when they divide; else the one head shared by this rank's q heads.
    kv0 = rank * kvl if cfg.num_kv_heads % size == 0 else q0 // (cfg.num_heads // cfg.num_kv_heads)
    q_rows, kv_rows = cfg.num_heads * d, cfg.num_kv_heads * d
    qkv_offsets = (0, q_rows, q_rows + kv_rows)
    qkv_picks = ((q0 * d, hl * d), (kv0 * d, kvl * d), (kv0 * d, kvl * d))
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if not name.startswith("llm.layers."):
            out[name] = t  # embed, final norm, lm_head: replicated
            continue
        kind = name.split(".", 3)[3]
        if kind in ("qkv.weight", "qkv.bias"):
            out[name] = split_heads(t, qkv_offsets, qkv_picks)
        elif kind == "o.weight":
            out[name] = take_cols(t, q0 * d, hl * d)
        elif kind == "gate_up.weight":  # keep [gate_r; up_r] so silu_and_mul still splits in half
            out[name] = split_heads(t, (0, cfg.intermediate_size), ((rank * il, il), (rank * il, il)))
        elif kind == "down.weight":
            out[name] = take_cols(t, rank * il, il)
        else:
            out[name] = t  # norm1 / norm2: replicated
    return out


def shard_vision_weights(weights: dict[str, torch.Tensor], cfg: "FamilyShardRules", rank: int,
                         size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of the vision encoder: the family's own rules (its config's
    `shard_vision_weights`), since every encoder names and splits its tensors differently."""
    return cfg.shard_vision_weights(weights, rank, size)


def shard_weights(weights: dict[str, torch.Tensor], cfg: "FamilyShardRules", rank: int,
                  size: int) -> dict[str, torch.Tensor]:
    """Both halves of the model: the shared LLM rules, then the family's vision rules."""
    return shard_vision_weights(shard_llm_weights(weights, cfg.llm, rank, size), cfg, rank, size)


def load_for_rank(load: Callable[[str, bool], dict[str, torch.Tensor]], cfg: "FamilyShardRules", device: str,
                  tp: "TPGroup | None", progress: bool) -> dict[str, torch.Tensor]:
    """`load(device, progress)` (a family's whole-model loader), then, under tensor parallelism,
    this rank's shard: the whole model is read to the host and sharded there, and only the shard
    moves to `device` (a rank's GPU never holds the full model; tied tensors stay one copy)."""
    if tp is None or tp.size == 1:
        return load(device, progress)
    full = load("cpu", progress and tp.rank == 0)
    shard = shard_weights(full, cfg, tp.rank, tp.size)
    del full  # the shard's sliced tensors are copies, so this frees the unsharded ones
    moved: dict[int, torch.Tensor] = {}  # tied embed / lm_head: one copy on the device
    return {name: moved.setdefault(id(t), t.to(device)) for name, t in shard.items()}


class FamilyShardRules(Protocol):
    """What `shard_weights` needs from a family's config."""

    llm: LLMConfig

    def shard_vision_weights(self, weights: dict[str, torch.Tensor], rank: int,
                             size: int) -> dict[str, torch.Tensor]: ...
