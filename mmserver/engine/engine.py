"""The generation engine: requests in, one token per running request per step out.

Each `step()` admits what fits (peak-KV admission), encodes the images of newly admitted
requests, packs prefill chunks and decode tokens of every running request into one
forward, samples, and retires finished requests at once (continuous batching). The same
engine runs in-process (the pipeline) and inside the server's model worker.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.llm.decoder import DecoderLM, ForwardBatch
from .cuda_graphs import (DecodeGraphs, HostBatch, InputBuffers, PadValues, batch_bytes, graph_sizes,
                          graphs_enabled)
from .kv_pool import KVPool, TokenTable
from .sampling import Sampler, SamplingParams, make_generator
from .scheduler import Footprint, fits
from .tp import TPLeader, broadcast_batch

log = logging.getLogger("mmserver.engine")


class RequestError(ValueError):
    """A request the engine cannot run (too long, bad parameters)."""


@dataclass
class EngineConfig:
    max_total_tokens: int = 16384  # KV slots (the pool holds one more, the CUDA-graph scratch slot)
    max_requests: int = 64  # --running_max_req_size
    max_req_len: int = 8192  # --max_req_total_len: prompt + new tokens
    batch_max_tokens: int = 8192  # prompt tokens prefilled per step (chunk size)
    vit_batch_tiles: int = 64  # tiles per ViT forward
    # Replay decode steps from CUDA graphs (CUDA devices only; MMSERVER_CUDA_GRAPHS=0 also turns them off).
    cuda_graphs: bool = True


@dataclass
class Request:
    req_id: int
    prompt_ids: list[int]
    params: SamplingParams
    # Either the image embeddings ([n_image_tokens, H]) or per-image pixel tensors to encode.
    image_embeds: torch.Tensor | None = None
    pixel_values: list[torch.Tensor] | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    row: int = -1
    num_cached: int = 0  # tokens whose K/V are in the pool
    finished: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    image_offsets: list[int] = field(default_factory=list)  # prompt positions of image tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def footprint(self) -> Footprint:
        return Footprint(self.num_tokens, self.params.max_new_tokens - len(self.output_ids))


@dataclass
class StepOutput:
    req_id: int
    token_id: int
    logprob: float
    finished: bool
    finish_reason: str | None


class Engine:
    def __init__(self, llm: DecoderLM, config: EngineConfig, image_token_id: int,
                 encode_images: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.llm = llm
        self.config = config
        self.image_token_id = image_token_id
        self.encode_images = encode_images
        self.device = llm.device
        self.kv = KVPool(llm.kv_shape(config.max_total_tokens), llm.dtype, llm.device)
        self.table = TokenTable(config.max_requests, config.max_req_len, llm.device)
        self.sampler = Sampler()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.requests: dict[int, Request] = {}
        # Every batch's integer inputs go to the device in one copy (sized for the largest batch).
        self._inputs = InputBuffers(self.device, batch_bytes(config.batch_max_tokens + config.max_requests,
                                                             config.max_requests, config.max_requests))
        # Sampled tokens and logprobs come back in one sync, through pinned buffers on CUDA.
        pin = self.device.type == "cuda"
        self._out_tokens = torch.empty(config.max_requests, dtype=torch.int64, pin_memory=pin)
        self._out_logprobs = torch.empty(config.max_requests, dtype=torch.float32, pin_memory=pin)
        self.graphs: DecodeGraphs | None = None
        if graphs_enabled(config.cuda_graphs, self.device):
            self.graphs = self._init_graphs()

    # ----------------------------------------------------------------------------------
    # Public API

    def add_request(self, prompt_ids: list[int], params: SamplingParams, image_embeds: torch.Tensor | None = None,
                    pixel_values: list[torch.Tensor] | None = None, req_id: int | None = None) -> int:
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
        offsets = [i for i, t in enumerate(prompt_ids) if t == self.image_token_id]
        n_rows = image_embeds.shape[0] if image_embeds is not None else None
        if pixel_values is not None and self.encode_images is None:
            raise RequestError("this engine has no vision encoder")
        if pixel_values is None and n_rows is None and offsets:
            raise RequestError(f"prompt has {len(offsets)} image tokens but no images were given")
        if n_rows is not None and n_rows != len(offsets):
            raise RequestError(f"prompt has {len(offsets)} image tokens but {n_rows} image embedding rows were given")
        rid = next(self._ids) if req_id is None else req_id
        req = Request(rid, list(prompt_ids), params, image_embeds=image_embeds, pixel_values=pixel_values,
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
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        self._admit()
        if not self.running:
            return []
        batch, plan, graph_size = self._build_batch()
        if graph_size is not None:
            logits = self.graphs.replay(graph_size, batch, len(plan))
        else:
            logits = self.llm.forward(batch, self.kv.buffer, self.table.table)
        return self._sample_and_update(logits, plan)

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
        admitted: list[Request] = []
        while self.waiting and len(self.running) < self.config.max_requests and self.table.free_rows:
            cand = self.waiting[0]
            if not fits([r.footprint for r in self.running], cand.footprint, self.config.max_total_tokens):
                break  # FIFO: a big request is not overtaken, so it cannot starve
            self.waiting.popleft()
            cand.row = self.table.alloc_row()
            self.running.append(cand)
            admitted.append(cand)
        self._encode_pending([r for r in admitted if r.pixel_values is not None])

    def _encode_pending(self, reqs: list[Request]) -> None:
        if not reqs:
            return
        tiles = torch.cat([t for r in reqs for t in r.pixel_values], dim=0)
        feats = torch.cat([self.encode_images(tiles[i:i + self.config.vit_batch_tiles])
                           for i in range(0, tiles.shape[0], self.config.vit_batch_tiles)])
        feats = feats.reshape(-1, feats.shape[-1])
        start = 0
        for r in reqs:
            n = len(r.image_offsets)
            r.image_embeds, r.pixel_values = feats[start:start + n], None
            start += n
        if start != feats.shape[0]:
            raise RequestError(f"images produced {feats.shape[0]} embedding rows but prompts hold {start} image tokens")

    def _build_batch(self) -> tuple[ForwardBatch, list[tuple[Request, bool]], int | None]:
        """Pack this step's prefill chunks and decode tokens; returns the batch, (request, produces a
        token) per row, and the graph size to replay (None: run eagerly)."""
        decodes = sum([r.num_cached >= len(r.prompt_ids) for r in self.running])
        if decodes == len(self.running):
            hb, plan = self._decode_host_batch()
            image_parts: list[torch.Tensor] = []
        else:
            hb, plan, image_parts = self._mixed_host_batch(decodes)
        graph_size = None
        if self.graphs is not None and hb.max_q_len == 1 and not image_parts and len(hb.logit_rows) == len(plan):
            graph_size = self.graphs.bucket(len(plan))
        if graph_size is not None:
            batch, index = self.graphs.inputs(graph_size).pack(self.graphs.pad_batch(hb, graph_size))
        else:
            image_rows = torch.cat(image_parts).to(self.device, self.llm.dtype) if image_parts else None
            batch, index = self._inputs.pack(hb, image_rows)
        self.table.write(index, batch.slots)  # before the forward: attention reads the new tokens' slots
        return batch, plan, graph_size

    def _decode_host_batch(self) -> tuple[HostBatch, list[tuple[Request, bool]]]:
        """Every running request decodes one token: the steady state, built with comprehensions
        because its host time adds to every step's."""
        running = self.running
        n = len(running)
        width = self.table.max_len
        slots = self.kv.alloc(n).numpy()
        rows = [r.row for r in running]
        positions = [r.num_cached for r in running]
        self.table.record_decode(rows, positions, slots)
        for r in running:
            r.num_cached += 1
        hb = HostBatch(input_ids=[r.output_ids[-1] for r in running], positions=positions,
                       table_index=[row * width + p for row, p in zip(rows, positions)], slots=slots,
                       req_rows=rows, cu_q=range(n + 1), prefix_lens=positions, seq_lens=[p + 1 for p in positions],
                       logit_rows=range(n), max_q_len=1, max_seq_len=max(positions) + 1)
        return hb, [(r, True) for r in running]

    def _mixed_host_batch(self, decodes: int) -> tuple[HostBatch, list[tuple[Request, bool]], list[torch.Tensor]]:
        """Prefill chunks (within batch_max_tokens) beside the decode tokens."""
        budget = max(self.config.batch_max_tokens - decodes, 1)
        chunks: list[tuple[Request, int, int]] = []  # (request, first new position, new tokens)
        for r in self.running:
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
                ids.append(r.output_ids[-1])
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

    def _sample_and_update(self, logits: torch.Tensor, plan: list[tuple[Request, bool]]) -> list[StepOutput]:
        producers = [r for r, produces in plan if produces]
        if not producers:
            return []
        token_ids, logprobs = self.sampler(logits, [r.params for r in producers], [r.prompt_ids for r in producers],
                                           [r.output_ids for r in producers], [r.generator for r in producers])
        token_ids, logprobs = self._to_host(token_ids, logprobs)
        outs = []
        for r, tok, lp in zip(producers, token_ids, logprobs):
            r.output_ids.append(tok)
            r.output_logprobs.append(lp)
            reason = self._finish_reason(r, tok)
            if reason:
                self._finish(r, reason)
            outs.append(StepOutput(r.req_id, tok, lp, r.finished, r.finish_reason))
        return outs

    def _to_host(self, token_ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[list[int], list[float]]:
        """Both results as lists with one stream sync: two async copies into pinned buffers, one wait."""
        if not token_ids.is_cuda:
            return token_ids.tolist(), logprobs.tolist()
        n = token_ids.numel()
        if n > self._out_tokens.numel():
            self._out_tokens = torch.empty(n, dtype=torch.int64, pin_memory=True)
            self._out_logprobs = torch.empty(n, dtype=torch.float32, pin_memory=True)
        tok, lp = self._out_tokens[:n], self._out_logprobs[:n]
        tok.copy_(token_ids, non_blocking=True)
        lp.copy_(logprobs, non_blocking=True)
        torch.cuda.current_stream(token_ids.device).synchronize()
        return tok.tolist(), lp.tolist()

    def _finish_reason(self, r: Request, tok: int) -> str | None:
        p = r.params
        if not p.ignore_eos and tok in p.stop_token_ids and len(r.output_ids) >= p.min_new_tokens:
            return "stop"
        if len(r.output_ids) >= p.max_new_tokens or r.num_tokens >= self.config.max_req_len:
            return "length"
        return None

    def _finish(self, r: Request, reason: str) -> None:
        r.finished, r.finish_reason = True, reason
        if r.row >= 0:
            self.kv.release(self.table.free_row(r.row))
            r.row = -1
        if r in self.running:
            self.running.remove(r)
        r.image_embeds = r.pixel_values = None
        self.requests.pop(r.req_id, None)
