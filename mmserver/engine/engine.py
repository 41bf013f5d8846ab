"""The generation engine: requests in, one token per running request per step out.

Each `step()` admits what fits (peak-KV admission), packs prefill chunks and decode tokens of every running request into one
forward, samples, and retires finished requests at once (continuous batching). The same
engine runs in-process (the pipeline) and inside the server's model worker.

Overlap schedule (`EngineConfig.overlap_schedule`, on by default on CUDA): `step()` launches
step N's forward and sampling, and only then waits for step N-1's sampled tokens and does
their bookkeeping (finish checks, outputs), so the host builds and retires batches while the
GPU computes. Step N reads the tokens of step N-1 on the device: their host input ids are the
sentinel -1 - i (row i of step N-1's sampled tokens) and `_fill_pending_ids` swaps them in
before the forward. Consequences, all invisible in the outputs:
* a request that stops on an EOS token at step N-1 has already been fed to step N; that
  extra token is dropped and its KV slot freed with the request's others;
* a request that ends by length is known to end and is left out of step N;
* a batch with repetition/presence/frequency penalties needs its tokens on the host to
  sample, so pending tokens are resolved first (that step does not overlap).
Each step's outputs come back one `step()` later; `has_work()` stays true until they have.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..models.llm.decoder import DecoderLM, ForwardBatch
from .cuda_graphs import (DecodeGraphs, HostBatch, InputBuffers, PadValues, batch_bytes, graph_sizes,
                          graphs_enabled)
from .config import EngineConfig
from .kv_pool import allocate_kv
from .sampling import Sampler, SamplingParams, make_generator
from .scheduler import Footprint, fits
from .tp import TPLeader, broadcast_batch

log = logging.getLogger("mmserver.engine")


class RequestError(ValueError):
    """A request the engine cannot run (too long, bad parameters)."""


@dataclass
class Request:
    req_id: int
    prompt_ids: list[int]
    params: SamplingParams
    # Image embedding rows ([n_image_tokens, H]), in prompt order; row k replaces the embedding
    # of the prompt token at image_offsets[k].
    image_embeds: torch.Tensor | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    row: int = -1
    num_cached: int = 0  # tokens whose K/V are in the pool
    finished: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    image_offsets: list[int] = field(default_factory=list)  # prompt positions of image tokens
    pending: int = 0  # tokens sampled on the device, not yet in output_ids (overlap schedule)
    pending_index: int = -1  # row of the latest of them in its step's sampled tokens

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens, the pending ones included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def footprint(self) -> Footprint:
        return Footprint(self.num_tokens, self.params.max_new_tokens - len(self.output_ids) - self.pending)


@dataclass
class StepOutput:
    req_id: int
    token_id: int
    logprob: float
    finished: bool
    finish_reason: str | None


@dataclass
class _Launched:
    """A step whose sampled tokens are still on their way to the host."""

    producers: list[Request]  # in the order of the sampled rows
    tokens: torch.Tensor  # [R] int64 on the device: what the next step's sentinel ids index
    host_tokens: torch.Tensor  # [R] views of the pinned buffers the results are copied to
    host_logprobs: torch.Tensor
    ready: torch.cuda.Event | None  # recorded after the copies (CUDA)


class Engine:
    def __init__(self, llm: DecoderLM, config: EngineConfig):
        self.llm = llm
        self.config = config
        self.device = llm.device
        self.kv, self.table = allocate_kv(llm, config)
        self.sampler = Sampler()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.requests: dict[int, Request] = {}
        # Every batch's integer inputs go to the device in one copy (sized for the largest batch).
        self._inputs = InputBuffers(self.device, batch_bytes(config.batch_max_tokens + config.max_requests,
                                                             config.max_requests, config.max_requests))
        # Sampled tokens and logprobs come back through pinned buffers on CUDA, one wait per step;
        # two pairs, used in turn, since one step's results are read while the next is copied.
        self._pinned = self.device.type == "cuda"
        self._out_buffers = [self._host_buffers(config.max_requests) for _ in range(2)]
        self._launches = 0
        self._inflight: deque[_Launched] = deque()
        overlap = config.overlap_schedule
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self.graphs: DecodeGraphs | None = None
        if graphs_enabled(config.cuda_graphs, self.device):
            self.graphs = self._init_graphs()

    # ----------------------------------------------------------------------------------
    # Public API

    def add_request(self, prompt_ids: list[int], params: SamplingParams, image_embeds: torch.Tensor | None = None,
                    image_spans: Sequence[tuple[int, int]] = (), req_id: int | None = None) -> int:
        """Queue a request. `image_spans` are the (start, length) prompt ranges whose embeddings
        are replaced by `image_embeds` rows, in order (the model family's prompt expansion says
        where its images are; the engine never looks at token ids for that)."""
        params.validate()
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise RequestError("prompt is empty")
        total = n_prompt + params.max_new_tokens
        if total > self.config.max_req_len:
            raise RequestError(f"prompt ({n_prompt} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                               f"exceeds max_req_total_len {self.config.max_req_len}")
        if total > self.config.max_total_tokens:
            raise RequestError(f"request needs {total} KV slots but the pool has {self.config.max_total_tokens}")
        offsets = _span_offsets(image_spans, n_prompt)
        n_rows = image_embeds.shape[0] if image_embeds is not None else 0
        if n_rows != len(offsets):
            raise RequestError(f"prompt has {len(offsets)} image tokens but {n_rows} image embedding rows were given")
        rid = next(self._ids) if req_id is None else req_id
        req = Request(rid, list(prompt_ids), params, image_embeds=image_embeds if n_rows else None,
                      generator=make_generator(params.seed, self.device), image_offsets=offsets)
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def abort(self, req_id: int, reason: str = "abort") -> None:
        """Finish a request now (client gone, stop string seen); frees its slots at once."""
        req = self.requests.get(req_id)
        if req is None or req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, reason)

    def has_work(self) -> bool:
        """Requests waiting or running (a running one may only await its last pending token)."""
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Launch the next forward; return the tokens of the step that just came back (this one's
        without the overlap schedule, the previous one's with it)."""
        self._admit()
        outs: list[StepOutput] = []
        batch_reqs = [r for r in self.running if not self._ends_by_length(r)]
        if self._inflight and any(r.params.has_penalties for r in batch_reqs):
            outs += self._resolve(self._inflight.popleft())  # penalties read the tokens on the host
            batch_reqs = [r for r in self.running if not self._ends_by_length(r)]
        if batch_reqs:
            self._inflight.append(self._launch(batch_reqs))
        keep = 1 if self.overlap and batch_reqs else 0
        while len(self._inflight) > keep:
            outs += self._resolve(self._inflight.popleft())
        return outs

    def _launch(self, reqs: list[Request]) -> _Launched:
        """Forward and sample one batch of `reqs` without waiting for the device."""
        batch, plan, graph_size = self._build_batch(reqs)
        if graph_size is not None:
            logits = self.graphs.replay(graph_size, batch, len(plan))
        else:
            logits = self.llm.forward(batch, self.kv.buffer, self.table.table)
        producers = [r for r, produces in plan if produces]
        if not producers:
            empty = torch.empty(0, dtype=torch.int64)
            return _Launched([], empty, empty, empty, None)
        if any(r.pending and r.params.has_penalties for r in producers):
            raise RuntimeError("a penalised request is sampled before its previous token reached the host")
        token_ids, logprobs = self.sampler(logits, [r.params for r in producers], [r.prompt_ids for r in producers],
                                           [r.output_ids for r in producers], [r.generator for r in producers],
                                           num_outputs=[len(r.output_ids) + r.pending for r in producers])
        for i, r in enumerate(producers):
            r.pending += 1
            r.pending_index = i
        return self._copy_to_host(producers, token_ids, logprobs)

    # ----------------------------------------------------------------------------------
    # CUDA graphs

    def _init_graphs(self, emulate: bool = False) -> DecodeGraphs | None:
        """Capture the decode graphs; on failure warn and decode eagerly. `emulate` replays the
        padded batches eagerly instead of capturing (CPU tests of everything but the graphs)."""
        model, announce = self.llm, None
        if isinstance(self.llm, TPLeader):  # capture the local shard; broadcast each padded batch first
            model = self.llm.llm
            announce = functools.partial(broadcast_batch, self.llm.tp, device=model.device,
                                         hidden=model.cfg.hidden_size, dtype=model.dtype)
        sizes = graph_sizes(self.config.max_requests)
        t = self.table
        pad = PadValues(self.kv.scratch_slot, t.pad_row, t.pad_position, t.flat_index(t.pad_row, t.pad_position))
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # so that the growth below is the graphs' memory
        reserved = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        try:
            if t.pad_position >= model.cfg.max_position_embeddings:  # pad rows' rope reads cos/sin there
                raise ValueError(f"max_req_len {self.config.max_req_len} exceeds the model's max_position_embeddings")
            graphs = DecodeGraphs(model, self.kv.buffer, self.table.table, sizes, self.config.max_req_len, pad,
                                  announce)
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

    # ----------------------------------------------------------------------------------
    # Scheduling

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_requests and self.table.free_rows:
            cand = self.waiting[0]
            if not fits([r.footprint for r in self.running], cand.footprint, self.config.max_total_tokens):
                break  # FIFO: a big request is not overtaken, so it cannot starve
            self.waiting.popleft()
            cand.row = self.table.alloc_row()
            self.running.append(cand)

    def _length_reached(self, r: Request, generated: int) -> bool:
        """`generated` tokens end `r` by length: max_new_tokens or max_req_len."""
        return generated >= r.params.max_new_tokens or len(r.prompt_ids) + generated >= self.config.max_req_len

    def _ends_by_length(self, r: Request) -> bool:
        """Its pending token is its last: nothing more to run."""
        return r.pending > 0 and self._length_reached(r, len(r.output_ids) + r.pending)

    def _build_batch(self, reqs: list[Request]) -> tuple[ForwardBatch, list[tuple[Request, bool]], int | None]:
        """Pack this step's prefill chunks and decode tokens of `reqs`; returns the batch, (request,
        produces a token) per row, and the graph size to replay (None: run eagerly)."""
        decodes = sum([r.num_cached >= len(r.prompt_ids) for r in reqs])
        if decodes == len(reqs):
            hb, plan = self._decode_host_batch(reqs)
            image_parts: list[torch.Tensor] = []
        else:
            hb, plan, image_parts = self._mixed_host_batch(reqs, decodes)
        graph_size = None
        if self.graphs is not None and hb.max_q_len == 1 and not image_parts and len(hb.logit_rows) == len(plan):
            graph_size = self.graphs.bucket(len(plan))
        if graph_size is not None:
            batch, index = self.graphs.inputs(graph_size).pack(self.graphs.pad_batch(hb, graph_size))
        else:
            image_rows = self._image_rows(image_parts) if image_parts else None
            batch, index = self._inputs.pack(hb, image_rows)
        if any(r.pending for r, _ in plan):
            self._fill_pending_ids(batch.input_ids, self._inflight[-1].tokens)
        self.table.write(index, batch.slots)  # before the forward: attention reads the new tokens' slots
        return batch, plan, graph_size

    def _image_rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """This batch's image embedding rows on the device. Host rows (the server's, read from
        shared memory) go through pinned memory: a pageable host→GPU copy would wait for the
        step in flight and undo the overlap."""
        if self._pinned and not parts[0].is_cuda:
            host = torch.empty((sum(p.shape[0] for p in parts), parts[0].shape[1]), dtype=parts[0].dtype,
                               pin_memory=True)
            return torch.cat(parts, out=host).to(self.device, self.llm.dtype, non_blocking=True)
        return torch.cat(parts).to(self.device, self.llm.dtype)

    @staticmethod
    def _fill_pending_ids(input_ids: torch.Tensor, previous: torch.Tensor) -> None:
        """In place on the device: sentinel ids -1 - i become row i of the previous step's tokens."""
        source = (-1 - input_ids).clamp_(min=0)
        input_ids.copy_(torch.where(input_ids < 0, previous[source], input_ids))

    @staticmethod
    def _last_token(r: Request) -> int:
        """The input id of a decode step: the last token, or the sentinel naming its device row."""
        return -1 - r.pending_index if r.pending else r.output_ids[-1]

    def _decode_host_batch(self, running: list[Request]) -> tuple[HostBatch, list[tuple[Request, bool]]]:
        """Every request decodes one token: the steady state, built with comprehensions
        because its host time adds to every step's."""
        n = len(running)
        width = self.table.max_len
        slots = self.kv.alloc(n).numpy()
        rows = [r.row for r in running]
        positions = [r.num_cached for r in running]
        self.table.record_decode(rows, positions, slots)
        for r in running:
            r.num_cached += 1
        hb = HostBatch(input_ids=[self._last_token(r) for r in running], positions=positions,
                       table_index=[row * width + p for row, p in zip(rows, positions)], slots=slots,
                       req_rows=rows, cu_q=range(n + 1), prefix_lens=positions, seq_lens=[p + 1 for p in positions],
                       logit_rows=range(n), max_q_len=1, max_seq_len=max(positions) + 1)
        return hb, [(r, True) for r in running]

    def _mixed_host_batch(self, reqs: list[Request],
                          decodes: int) -> tuple[HostBatch, list[tuple[Request, bool]], list[torch.Tensor]]:
        """Prefill chunks (within batch_max_tokens) beside the decode tokens."""
        budget = max(self.config.batch_max_tokens - decodes, 1)
        chunks: list[tuple[Request, int, int]] = []  # (request, first new position, new tokens)
        for r in reqs:
            start = r.num_cached
            if start < len(r.prompt_ids):
                if budget <= 0:
                    continue
                n = min(len(r.prompt_ids) - start, budget)
                budget -= n
            else:
                n = 1
            chunks.append((r, start, n))
        slots = self.kv.alloc(sum(n for _, _, n in chunks)).numpy()  # one allocation for the step

        width = self.table.max_len
        ids, positions, table_index, rows, cu_q, prefix, seq, logit_rows = [], [], [], [], [0], [], [], []
        image_parts: list[torch.Tensor] = []
        image_index: list[int] | None = None  # built only once an image chunk shows up
        image_base = 0
        plan: list[tuple[Request, bool]] = []
        for r, start, n in chunks:
            self.table.record(r.row, start, slots[cu_q[-1]:cu_q[-1] + n])
            if start < len(r.prompt_ids):
                ids.extend(r.prompt_ids[start:start + n])
                positions.extend(range(start, start + n))
                table_index.extend(range(r.row * width + start, r.row * width + start + n))
            else:
                ids.append(self._last_token(r))
                positions.append(start)
                table_index.append(r.row * width + start)
            used = None
            if r.image_embeds is not None and start < len(r.prompt_ids):
                idx, used = self._image_index(r, start, n, image_base)
            if used is not None:
                image_index = image_index if image_index is not None else [-1] * cu_q[-1]
                image_index.extend(idx)
                image_parts.append(used)
                image_base += used.shape[0]
            elif image_index is not None:
                image_index.extend([-1] * n)
            rows.append(r.row)
            prefix.append(start)
            seq.append(start + n)
            cu_q.append(cu_q[-1] + n)
            r.num_cached = start + n
            produces = r.num_cached == r.num_tokens
            if produces:
                logit_rows.append(cu_q[-1] - 1)
            plan.append((r, produces))

        max_q = max(n for _, _, n in chunks)
        hb = HostBatch(input_ids=ids, positions=positions, table_index=table_index, slots=slots, req_rows=rows,
                       cu_q=cu_q, prefix_lens=prefix, seq_lens=seq, logit_rows=logit_rows, max_q_len=max_q,
                       max_seq_len=max(seq), image_index=image_index)
        return hb, plan, image_parts

    @staticmethod
    def _image_index(r: Request, start: int, n: int, base: int) -> tuple[list[int], torch.Tensor | None]:
        """Map this chunk's image tokens to rows of the batch's image tensor."""
        lo = bisect.bisect_left(r.image_offsets, start)
        hi = bisect.bisect_left(r.image_offsets, start + n)
        idx = [-1] * n
        if lo == hi:
            return idx, None
        for k, pos in enumerate(r.image_offsets[lo:hi]):
            idx[pos - start] = base + k
        return idx, r.image_embeds[lo:hi]

    def _host_buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty(n, dtype=torch.int64, pin_memory=self._pinned),
                torch.empty(n, dtype=torch.float32, pin_memory=self._pinned))

    def _copy_to_host(self, producers: list[Request], token_ids: torch.Tensor, logprobs: torch.Tensor) -> _Launched:
        """Start both results' copies to the host (async on CUDA, into this step's pinned pair)."""
        if not token_ids.is_cuda:
            return _Launched(producers, token_ids, token_ids, logprobs, None)
        n, pair = token_ids.numel(), self._launches % 2
        self._launches += 1
        if n > self._out_buffers[pair][0].numel():
            self._out_buffers[pair] = self._host_buffers(n)
        tok, lp = (b[:n] for b in self._out_buffers[pair])
        tok.copy_(token_ids, non_blocking=True)
        lp.copy_(logprobs, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(producers, token_ids, tok, lp, ready)

    def _resolve(self, step: _Launched) -> list[StepOutput]:
        """Wait for a launched step's tokens (the one sync of a step); append them and retire
        what finished. Tokens of requests that finished meanwhile are dropped."""
        if step.ready is not None:
            step.ready.synchronize()
        outs = []
        for r, tok, lp in zip(step.producers, step.host_tokens.tolist(), step.host_logprobs.tolist()):
            r.pending -= 1
            if r.finished:  # stopped on an earlier token or aborted
                continue
            r.output_ids.append(tok)
            r.output_logprobs.append(lp)
            reason = self._finish_reason(r, tok)
            if reason:
                self._finish(r, reason)
            outs.append(StepOutput(r.req_id, tok, lp, r.finished, r.finish_reason))
        return outs

    def _finish_reason(self, r: Request, tok: int) -> str | None:
        p = r.params
        if not p.ignore_eos and tok in p.stop_token_ids and len(r.output_ids) >= p.min_new_tokens:
            return "stop"
        if self._length_reached(r, len(r.output_ids)):
            return "length"
        return None

    def _finish(self, r: Request, reason: str) -> None:
        r.finished, r.finish_reason = True, reason
        if r.row >= 0:
            self.kv.release(self.table.free_row(r.row))
            r.row = -1
        if r in self.running:
            self.running.remove(r)
        r.image_embeds = None
        self.requests.pop(r.req_id, None)


def _span_offsets(spans: Sequence[tuple[int, int]], n_prompt: int) -> list[int]:
    """Every prompt position covered by `spans`, checked to be in order, disjoint and in the prompt."""
    offsets: list[int] = []
    end = 0
    for start, length in spans:
        if start < end or length <= 0 or start + length > n_prompt:
            raise RequestError(f"image span ({start}, {length}) is out of order, empty or past the prompt "
                               f"({n_prompt} tokens)")
        offsets.extend(range(start, start + length))
        end = start + length
    return offsets
