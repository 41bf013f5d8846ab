"""The model runner: a `StepPlan` in, sampled tokens out, without waiting for the device.

It owns everything a step does with tensors, in order: KV slots for the new tokens, the host
batch (built by one function for every kind of batch: prefill, decode, mixed and, padded,
CUDA-graph), the one host→device copy (`batch_io`), the token-table write, the forward
(eager or a graph replay), sampling and the asynchronous copy of the results to the host.
`resolve` waits for those results (the one sync of a step). What runs and what the tokens
mean is the scheduler's business; the runner reads the plan and the requests, and changes
neither.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..models.llm.decoder import DecoderLM, ForwardBatch
from .batch_io import HostBatch, InputBuffers, batch_bytes
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs, PadValues, graph_sizes, paddable
from .kv_pool import KVPool, TokenTable
from .request import Request
from .sampling import Sampler
from .scheduler import StepPlan
from .tp import TPLeader, write_token_table

log = logging.getLogger("mmserver.engine")


@dataclass
class Launched:
    """A step whose sampled tokens are still on their way to the host."""

    producers: list[Request]  # in the order of the sampled rows
    tokens: torch.Tensor  # [R] int64 on the device: what the next step's pending input ids index
    host_tokens: torch.Tensor  # [R] views of the pinned buffers the results are copied to
    host_logprobs: torch.Tensor
    ready: torch.cuda.Event | None  # recorded after the copies (CUDA)
    # [R, K] top_logprobs alternatives on (or on their way to) the host; None when no row asked
    host_top_ids: torch.Tensor | None = None
    host_top_logprobs: torch.Tensor | None = None


def fill_pending_ids(input_ids: torch.Tensor, previous: torch.Tensor) -> None:
    """In place on the device: input ids -1 - i (`scheduler.pending_input_id(i)`) become row i of
    the previous step's sampled tokens."""
    source = (-1 - input_ids).clamp_(min=0)
    input_ids.copy_(torch.where(input_ids < 0, previous[source], input_ids))


class ModelRunner:
    """Runs `StepPlan`s on one model (a `DecoderLM` or a `TPLeader`) over the engine's KV pool and table."""

    def __init__(self, llm: DecoderLM, config: EngineConfig, kv: KVPool, table: TokenTable):
        self.llm = llm
        self.config = config
        self.kv, self.table = kv, table
        self.device = llm.device
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        # Every batch's integer inputs go to the device in one copy (sized for the largest batch).
        self._inputs = InputBuffers(self.device, batch_bytes(config.batch_max_tokens + config.max_requests,
                                                             config.max_requests, config.max_requests))
        # Sampled tokens and logprobs come back through pinned buffers on CUDA, one wait per step;
        # two pairs, used in turn, since one step's results are read while the next is copied.
        self._pinned = self.device.type == "cuda"
        self._out_buffers = [self._host_buffers(config.max_requests) for _ in range(2)]
        self._launches = 0

    # ----------------------------------------------------------------------------------
    # A step

    def launch(self, plan: StepPlan, previous: Launched | None) -> Launched:
        """Forward and sample `plan`; `previous` is the step in flight whose tokens it may read."""
        batch, graph_size = self.prepare(plan, previous)
        if graph_size is not None:
            logits = self.graphs.replay(graph_size, batch, len(plan))
        else:
            logits = self.llm.forward(batch, self.kv.buffer, self.table.table)
        rows = [i for i, produces in enumerate(plan.produces) if produces]
        if not rows:
            empty = torch.empty(0, dtype=torch.int64)
            return Launched([], empty, empty, empty, None)
        producers = [plan.requests[i] for i in rows]
        params = [r.params for r in producers]
        sample_args = (logits, params, [r.prompt_ids for r in producers], [r.output_ids for r in producers],
                       [r.generator for r in producers])
        num_outputs = [plan.num_generated[i] for i in rows]
        has_grammar = any(r.grammar is not None for r in producers)
        if not has_grammar and not any(p.top_logprobs for p in params):  # the common case, as cheap as ever
            token_ids, logprobs = self.sampler(*sample_args, num_outputs=num_outputs)
            return self._copy_to_host(producers, token_ids, logprobs)
        grammars = [r.grammar for r in producers] if has_grammar else None
        result = self.sampler.sample(*sample_args, num_outputs=num_outputs, grammars=grammars)
        return self._copy_to_host(producers, result.token_ids, result.logprobs, result.top_ids, result.top_logprobs)

    def resolve(self, step: Launched) -> tuple[list[Request], list[int], list[float],
                                               list[list[tuple[int, float]] | None] | None]:
        """Wait for a launched step's results: its producing requests, tokens, logprobs and, when
        some row asked for them, each row's top_logprobs alternatives ((id, logprob), best
        first; None for a row that asked for none)."""
        if step.ready is not None:
            step.ready.synchronize()
        top = None
        if step.host_top_ids is not None:
            ids, lps = step.host_top_ids.tolist(), step.host_top_logprobs.tolist()
            top = [list(zip(i[:r.params.top_logprobs], lp[:r.params.top_logprobs])) if r.params.top_logprobs
                   else None for r, i, lp in zip(step.producers, ids, lps)]
        return step.producers, step.host_tokens.tolist(), step.host_logprobs.tolist(), top

    def prepare(self, plan: StepPlan, previous: Launched | None) -> tuple[ForwardBatch, int | None]:
        """The device batch of `plan` with its token-table cells written; returns it and the
        graph size to replay it with (None: run it eagerly)."""
        hb, image_parts = self.host_batch(plan)
        graph_size = None
        if self.graphs is not None and paddable(hb) and hb.table_prefix_index is None:
            graph_size = self.graphs.bucket(hb.num_requests)
        if graph_size is not None:
            batch = self.graphs.inputs(graph_size).pack(self.graphs.pad_batch(hb, graph_size))
        else:
            batch = self._inputs.pack(hb, self._image_rows(image_parts) if image_parts else None)
        if plan.reads_pending:
            fill_pending_ids(batch.input_ids, previous.tokens)
        write_token_table(batch, self.table.table)  # before the forward: attention reads these cells
        return batch, graph_size

    # ----------------------------------------------------------------------------------
    # The host batch: one builder for every kind of batch

    def host_batch(self, plan: StepPlan) -> tuple[HostBatch, list[torch.Tensor]]:
        """Allocate and record the new tokens' KV slots; returns the batch's integer inputs and
        its image embedding rows (in image_index order)."""
        rows = [r.row for r in plan.requests]
        counts = np.asarray(plan.num_tokens, dtype=np.int64)
        slots = self.kv.alloc(int(counts.sum())).numpy()  # one allocation for the step
        positions, table_index = self.table.record_step(rows, plan.starts, counts, slots)
        cu_q = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=cu_q[1:])
        prefix_lens = np.asarray(plan.starts, dtype=np.int64)
        seq_lens = prefix_lens + counts
        image_index, image_parts = self._image_index(plan, cu_q)
        prefix_index, prefix_slots = self.table.take_prefix_writes() or (None, None)
        hb = HostBatch(input_ids=self._input_ids(plan), rope_positions=self._rope_positions(plan, positions, cu_q),
                       table_index=table_index, slots=slots, req_rows=rows, cu_q=cu_q, prefix_lens=prefix_lens,
                       seq_lens=seq_lens, logit_rows=cu_q[1:][np.asarray(plan.produces, dtype=bool)] - 1,
                       max_q_len=int(counts.max()), max_seq_len=int(seq_lens.max()), image_index=image_index,
                       table_prefix_index=prefix_index, table_prefix_slots=prefix_slots)
        return hb, image_parts

    @staticmethod
    def _input_ids(plan: StepPlan) -> list[int]:
        if plan.all_decode:
            return plan.decode_inputs
        ids: list[int] = []
        for r, start, n, decode_input in zip(plan.requests, plan.starts, plan.num_tokens, plan.decode_inputs):
            if start < len(r.prompt_ids):
                ids.extend(r.prompt_ids[start:start + n])
            else:
                ids.append(decode_input)
        return ids

    @staticmethod
    def _rope_positions(plan: StepPlan, positions: np.ndarray, cu_q: np.ndarray) -> np.ndarray:
        """[P, T]: each token's RoPE positions; its cache position unless its request says otherwise."""
        if all(r.rope_positions is None and r.rope_delta == 0 for r in plan.requests):
            return positions[None]
        if all(start >= len(r.prompt_ids) or (r.rope_positions is None and r.rope_delta == 0)
               for r, start in zip(plan.requests, plan.starts)):
            # No token inside an M-RoPE prompt: every row would be p + rope_delta, so one row is
            # the same positions (plain RoPE) and decode batches can replay the CUDA graphs.
            shift = np.repeat(np.asarray([r.rope_delta if start >= len(r.prompt_ids) else 0
                                         for r, start in zip(plan.requests, plan.starts)], dtype=np.int64),
                              np.asarray(plan.num_tokens, dtype=np.int64))
            return (positions + shift)[None]
        rope = np.empty((max(r.rope_rows for r in plan.requests), len(positions)), dtype=np.int64)
        for r, start, n, first in zip(plan.requests, plan.starts, plan.num_tokens, cu_q):
            rope[:, first:first + n] = r.rope_span(start, n)
        return rope

    @staticmethod
    def _image_index(plan: StepPlan, cu_q: np.ndarray) -> tuple[np.ndarray | None, list[torch.Tensor]]:
        """Each token's row in the batch's image rows (-1: none), or None without image tokens."""
        image_index, parts, base = None, [], 0
        if plan.all_decode:
            return image_index, parts
        for i, (r, start, n) in enumerate(zip(plan.requests, plan.starts, plan.num_tokens)):
            if r.image_embeds is None or start >= len(r.prompt_ids):
                continue
            lo = bisect.bisect_left(r.image_offsets, start)
            hi = bisect.bisect_left(r.image_offsets, start + n)
            if lo == hi:
                continue
            if image_index is None:
                image_index = np.full(int(cu_q[-1]), -1, dtype=np.int32)
            image_index[np.asarray(r.image_offsets[lo:hi]) - start + cu_q[i]] = np.arange(base, base + hi - lo)
            parts.append(r.image_embeds[lo:hi])
            base += hi - lo
        return image_index, parts

    def _image_rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """This batch's image embedding rows on the device. Host rows (the server's, read from
        shared memory) go through pinned memory: a pageable host→GPU copy would wait for the
        step in flight and undo the overlap."""
        if self._pinned and not parts[0].is_cuda:
            host = torch.empty((sum(p.shape[0] for p in parts), parts[0].shape[1]), dtype=parts[0].dtype,
                               pin_memory=True)
            return torch.cat(parts, out=host).to(self.device, self.llm.dtype, non_blocking=True)
        return torch.cat(parts).to(self.device, self.llm.dtype)

    # ----------------------------------------------------------------------------------
    # Results

    def _host_buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty(n, dtype=torch.int64, pin_memory=self._pinned),
                torch.empty(n, dtype=torch.float32, pin_memory=self._pinned))

    def _copy_to_host(self, producers: list[Request], token_ids: torch.Tensor, logprobs: torch.Tensor,
                      top_ids: torch.Tensor | None = None, top_logprobs: torch.Tensor | None = None) -> Launched:
        """Start the results' copies to the host (async on CUDA, into this step's pinned pair;
        the rare top_logprobs into pinned blocks of torch's caching host allocator)."""
        if not token_ids.is_cuda:
            return Launched(producers, token_ids, token_ids, logprobs, None, top_ids, top_logprobs)
        n, pair = token_ids.numel(), self._launches % 2
        self._launches += 1
        if n > self._out_buffers[pair][0].numel():
            self._out_buffers[pair] = self._host_buffers(n)
        tok, lp = (b[:n] for b in self._out_buffers[pair])
        tok.copy_(token_ids, non_blocking=True)
        lp.copy_(logprobs, non_blocking=True)
        host_top_ids = host_top_lps = None
        if top_ids is not None:
            host_top_ids = torch.empty(top_ids.shape, dtype=top_ids.dtype, pin_memory=True)
            host_top_lps = torch.empty(top_logprobs.shape, dtype=top_logprobs.dtype, pin_memory=True)
            host_top_ids.copy_(top_ids, non_blocking=True)
            host_top_lps.copy_(top_logprobs, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Launched(producers, token_ids, tok, lp, ready, host_top_ids, host_top_lps)

    # ----------------------------------------------------------------------------------
    # CUDA graphs

    def capture_graphs(self, emulate: bool = False) -> DecodeGraphs | None:
        """Capture the decode graphs; on failure warn and return None (decode eagerly). `emulate`
        replays the padded batches eagerly instead of capturing (CPU tests of everything but
        the graphs). The caller installs the result as `graphs`."""
        model, announce = self.llm, None
        if isinstance(self.llm, TPLeader):  # capture the local shard; broadcast each padded batch first
            model, announce = self.llm.llm, self.llm.announce
        sizes = graph_sizes(self.config.max_requests)
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # so that the growth below is the graphs' memory
        reserved = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        try:
            graphs = DecodeGraphs(model, self.kv.buffer, self.table.table, sizes, self.config.max_req_len,
                                  PadValues.of(self.kv, self.table), announce)
            graphs.capture(emulate=emulate)
        except Exception:  # never fatal: the eager path serves the same requests
            log.warning("CUDA graph capture failed; decoding eagerly", exc_info=True)
            return None
        if emulate:
            log.info("decode graphs emulated (eager replays) for batch sizes %s", sizes)
        else:
            mib = (torch.cuda.memory_reserved(self.device) - reserved) / 2**20
            log.info("captured CUDA graphs for decode batch sizes %s in %.2f s (%.0f MiB)", sizes,
                     time.perf_counter() - start, mib)
        return graphs
