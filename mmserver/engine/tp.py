"""Driving tensor-parallel follower ranks from rank 0's Engine.

The model-side pieces (process group, sharding) live in `mmserver.models.parallel`; import
them from there.
"""

from __future__ import annotations

import torch

from ..models.llm.decoder import DecoderLM, ForwardBatch
from ..models.parallel import TPGroup


# ---------------------------------------------------------------------------------------
# Driving tp > 1 ranks from one Engine
#
# Rank 0 runs the Engine (scheduling, KV slot allocation, sampling); the other ranks run only
# the forward. Everything a follower needs per step is in the ForwardBatch: its token-table
# writes are table_index → slots, and its KV writes go to batch.slots, so its KV
# pool and token table stay in step with rank 0's without any allocator of its own.

_STOP, _FORWARD = 0, 1
# op, T, B, R, M, max_q_len, max_seq_len, has_image, P (rows of RoPE positions), E (cached-prefix table cells)
_HEADER = 10


def broadcast_batch(tp: TPGroup, batch: ForwardBatch | None, device: torch.device | str, hidden: int,
                    dtype: torch.dtype, stop: bool = False) -> ForwardBatch | None:
    """Rank 0 sends `batch` (or, with `stop`, the end of the loop); other ranks get a copy or None.

    Three broadcasts at most: a fixed-size header, every integer tensor packed into one, and
    the image embedding rows when the batch has any. The integers include the token-table
    cells of cached prefixes (`table_prefix_*`): a follower's table must hold a reused
    prefix's slots too, or its attention reads stale cells.
    """
    if tp.rank == 0:
        if stop:
            tp.broadcast(torch.zeros(_HEADER, dtype=torch.int64, device=device))
            return None
        b = batch
        has_image = b.image_rows is not None
        m = b.image_rows.shape[0] if has_image else 0
        e = b.table_prefix_index.numel() if b.table_prefix_index is not None else 0
        header = [_FORWARD, b.input_ids.numel(), b.req_rows.numel(), b.logit_rows.numel(), m, b.max_q_len,
                  b.max_seq_len, int(has_image), b.rope_positions.shape[0], e]
        tp.broadcast(torch.tensor(header, dtype=torch.int64, device=device))
        ints = [b.input_ids, b.rope_positions.reshape(-1), b.table_index, b.slots, b.req_rows, b.cu_q, b.prefix_lens,
                b.seq_lens, b.logit_rows] + ([b.image_index] if has_image else [])
        ints += [b.table_prefix_index, b.table_prefix_slots] if e else []
        tp.broadcast(torch.cat([t.to(device, torch.int64) for t in ints]))
        if has_image:
            tp.broadcast(b.image_rows.to(device, dtype).contiguous())
        return batch
    header = tp.broadcast(torch.empty(_HEADER, dtype=torch.int64, device=device)).tolist()
    op, t, nb, r, m, max_q, max_seq, has_image, p, e = header
    if op == _STOP:
        return None
    sizes = [t, p * t, t, t, nb, nb + 1, nb, nb, r] + ([t] if has_image else []) + ([e, e] if e else [])
    ints = tp.broadcast(torch.empty(sum(sizes), dtype=torch.int64, device=device)).split(sizes)
    i32 = torch.int32
    prefix_index, prefix_slots = (ints[-2], ints[-1].to(i32)) if e else (None, None)
    image_rows = tp.broadcast(torch.empty((m, hidden), dtype=dtype, device=device)) if has_image else None
    return ForwardBatch(input_ids=ints[0], rope_positions=ints[1].view(p, t), table_index=ints[2],
                        slots=ints[3].to(i32), req_rows=ints[4].to(i32), cu_q=ints[5].to(i32),
                        prefix_lens=ints[6].to(i32), seq_lens=ints[7].to(i32), max_q_len=max_q, max_seq_len=max_seq,
                        logit_rows=ints[8], image_rows=image_rows, image_index=ints[9].to(i32) if has_image else None,
                        table_prefix_index=prefix_index, table_prefix_slots=prefix_slots)


def write_token_table(batch: ForwardBatch, token_table: torch.Tensor) -> None:
    """What rank 0's `ModelRunner.prepare` did: each new token's slot into its cell (`batch.table_index`,
    from the token's cache position, never from its RoPE position), and the cells of cached
    prefixes that rows admitted since the last batch start with."""
    table = token_table.view(-1)
    table.index_copy_(0, batch.table_index, batch.slots.to(token_table.dtype))
    if batch.table_prefix_index is not None:
        table.index_copy_(0, batch.table_prefix_index, batch.table_prefix_slots.to(token_table.dtype))


class TPLeader:
    """Rank 0's stand-in for its DecoderLM: `Engine(TPLeader(llm, tp), ...)` sends every batch to
    the followers before running its own shard. Call `stop()` when done to end `follow()`."""

    def __init__(self, llm: DecoderLM, tp: TPGroup):
        self.llm, self.tp = llm, tp

    def __getattr__(self, name: str):  # device, dtype, cfg, kv_shape, ...: the wrapped model's
        return getattr(self.llm, name)

    def announce(self, batch: ForwardBatch) -> None:
        """Send `batch` to the followers (before running it here, eagerly or from a graph)."""
        broadcast_batch(self.tp, batch, self.llm.device, self.llm.cfg.hidden_size, self.llm.dtype)

    def forward(self, batch: ForwardBatch, kv_pool: torch.Tensor, token_table: torch.Tensor) -> torch.Tensor:
        self.announce(batch)
        return self.llm.forward(batch, kv_pool, token_table)

    def stop(self) -> None:
        broadcast_batch(self.tp, None, self.llm.device, self.llm.cfg.hidden_size, self.llm.dtype, stop=True)


def follow(llm: DecoderLM, kv_pool: torch.Tensor, token_table: torch.Tensor, tp: TPGroup) -> int:
    """Ranks > 0: run rank 0's batches until it stops; returns the number of steps run.

    `kv_pool` and `token_table` are the buffers of `kv_pool.allocate_kv(llm, config)` with rank
    0's config, as its Engine allocates them. The logits are dropped: rank 0 samples.
    """
    steps = 0
    while (batch := broadcast_batch(tp, None, llm.device, llm.cfg.hidden_size, llm.dtype)) is not None:
        write_token_table(batch, token_table)
        llm.forward(batch, kv_pool, token_table)
        steps += 1
    return steps
