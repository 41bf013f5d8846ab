"""One decoder for Qwen2, InternLM2 and LLaMA: they differ only in names (mapped at load
time), in whether q/k/v carry a bias, and in their constants.

The forward runs a packed batch: the new tokens of several requests concatenated, each
request reading its earlier tokens' K/V from the token-level KV pool through the token
table. Prefill chunks and single decode tokens can share one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import kernels
from ..parallel import TPGroup, local_kv_heads
from .config import LLMConfig


@dataclass
class ForwardBatch:
    """Everything one forward needs; tensors live on the model's device."""

    input_ids: torch.Tensor  # [T] int64
    # [P, T] int64: RoPE position of each new token, one row per rotary section (P = 1: plain
    # RoPE). Not its place in the KV cache: M-RoPE families give image tokens 2-D positions.
    rope_positions: torch.Tensor
    # [T] int64: where each new token's slot goes in the token table, row * width + its cache
    # position (the index of the token in its request's sequence). Rank 0 and the TP followers
    # write the table from it before the forward; the forward itself does not read it.
    table_index: torch.Tensor
    slots: torch.Tensor  # [T] int32: KV slot of each new token
    req_rows: torch.Tensor  # [B] int32: token-table row of each request
    cu_q: torch.Tensor  # [B+1] int32: new-token offsets in the packed batch
    prefix_lens: torch.Tensor  # [B] int32: tokens already cached before the new ones
    seq_lens: torch.Tensor  # [B] int32: prefix + new
    max_q_len: int
    max_seq_len: int
    logit_rows: torch.Tensor  # [R] int64: rows of the packed batch whose logits are needed
    image_rows: torch.Tensor | None = None  # [M, H] embeddings replacing image tokens
    image_index: torch.Tensor | None = None  # [T] int32: row in image_rows, or -1
    # [E] int64 / int32: more token-table cells to write with table_index → slots (a request
    # admitted with a cached prefix: its prefix positions' slots). The forward does not read them.
    table_prefix_index: torch.Tensor | None = None
    table_prefix_slots: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1


class DecoderLM:
    """With `tp`, `weights` are this rank's shard (see `models.parallel.shard_llm_weights`): the rank
    runs its own heads and MLP columns, and the o / down outputs are summed over ranks."""

    def __init__(self, cfg: LLMConfig, weights: dict[str, torch.Tensor], tp: TPGroup | None = None):
        self.cfg = cfg
        self.w = weights
        self.tp = tp if tp is not None and tp.size > 1 else None  # None: no collectives at all
        self.device = weights["llm.embed.weight"].device
        self.dtype = weights["llm.embed.weight"].dtype
        size = self.tp.size if self.tp else 1
        self.num_heads = cfg.num_heads // size
        self.num_kv_heads = local_kv_heads(cfg.num_heads, cfg.num_kv_heads, size)
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        rows = weights["llm.layers.0.qkv.weight"].shape[0]
        if rows != self.q_size + 2 * self.kv_size:
            raise ValueError(f"qkv weight has {rows} rows but tp={size} expects {self.q_size + 2 * self.kv_size}: "
                             "are the weights sharded for this tensor-parallel size?")
        self.scale = cfg.head_dim**-0.5
        self.cos, self.sin = kernels.rope_cos_sin(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta,
                                                  self.device)

    def kv_shape(self, num_slots: int) -> tuple[int, int, int, int]:
        """KV pool shape on this rank for `num_slots` usable slots: only its local KV heads, and one
        more slot, the scratch slot CUDA-graph padding rows write to (`engine.kv_pool`). Every
        rank sizes its pool here, so tensor-parallel followers get the scratch slot too."""
        c = self.cfg
        return (c.num_layers, num_slots + 1, 2 * self.num_kv_heads, c.head_dim)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_pool: torch.Tensor, token_table: torch.Tensor) -> torch.Tensor:
        """Returns float32 logits [R, vocab] for `batch.logit_rows`."""
        c, w = self.cfg, self.w
        positions, cos, sin = self._rope_tables(batch.rope_positions)
        h = kernels.embedding(batch.input_ids, w["llm.embed.weight"], batch.image_rows, batch.image_index)
        residual = None
        for i in range(c.num_layers):
            p = f"llm.layers.{i}."
            if residual is None:
                x, residual = kernels.rms_norm(h, w[p + "norm1.weight"], c.rms_norm_eps), h
            else:
                x, residual = kernels.rms_norm(h, w[p + "norm1.weight"], c.rms_norm_eps, residual=residual)
            h = self._attention(x, i, batch, positions, cos, sin, kv_pool[i], token_table)
            x, residual = kernels.rms_norm(h, w[p + "norm2.weight"], c.rms_norm_eps, residual=residual)
            h = F.linear(kernels.silu_and_mul(F.linear(x, w[p + "gate_up.weight"])), w[p + "down.weight"])
            if self.tp:
                self.tp.all_reduce(h)  # down is row-parallel
        # Only the rows that produce a next token need the final norm and the LM head.
        h = h.index_select(0, batch.logit_rows)
        residual = residual.index_select(0, batch.logit_rows)
        x, _ = kernels.rms_norm(h, w["llm.norm.weight"], c.rms_norm_eps, residual=residual)
        return F.linear(x, w["llm.lm_head.weight"]).float()

    def _rope_tables(self, rope_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions [T], cos, sin) for `rope_and_write_kv`: the model's tables at the positions of
        row 0 for plain RoPE (P = 1); for M-RoPE (P = len(mrope_section)) each token's own row of
        per-token tables, gathered once per forward for every layer (frequency block j rotates
        with position row j: t, h, w)."""
        section = self.cfg.mrope_section
        if rope_positions.shape[0] == 1:
            return rope_positions[0], self.cos, self.sin
        if len(section) != rope_positions.shape[0]:
            raise ValueError(f"{rope_positions.shape[0]} rows of RoPE positions, but the model's mrope_section is "
                             f"{list(section)}")
        cos, sin = kernels.mrope_cos_sin(rope_positions, self.cos, self.sin, section)
        return torch.arange(rope_positions.shape[1], device=rope_positions.device), cos, sin

    def _attention(self, x: torch.Tensor, i: int, b: ForwardBatch, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, kv: torch.Tensor, token_table: torch.Tensor) -> torch.Tensor:
        c, w = self.cfg, self.w
        p = f"llm.layers.{i}."
        t = x.shape[0]
        qkv = F.linear(x, w[p + "qkv.weight"], w.get(p + "qkv.bias"))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, c.head_dim)
        k = k.reshape(t, self.num_kv_heads, c.head_dim)
        v = v.reshape(t, self.num_kv_heads, c.head_dim)
        kernels.rope_and_write_kv(q, k, v, kv, positions, b.slots, cos, sin)  # k: read from kv only
        if b.is_decode:
            o = kernels.decode_attention(q, kv, token_table, b.req_rows, b.seq_lens, self.scale, b.max_seq_len)
        else:
            o = kernels.prefill_attention(q, kv, token_table, b.req_rows, b.cu_q, b.prefix_lens, b.max_q_len,
                                          self.scale)
        out = F.linear(o.reshape(t, self.q_size), w[p + "o.weight"])
        if self.tp:
            self.tp.all_reduce(out)  # o is row-parallel
        return out
