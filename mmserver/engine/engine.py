"""The generation engine: requests in, one token per running request per step out.

Each `step()` admits what fits (peak-KV admission), encodes the images of newly admitted
requests, packs prefill chunks and decode tokens of every running request into one
forward, samples, and retires finished requests at once (continuous batching). The same
engine runs in-process (the pipeline) and inside the server's model worker.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.llm.decoder import DecoderLM, ForwardBatch
from .kv_pool import KVPool, TokenTable
from .sampling import Sampler, SamplingParams, make_generator
from .scheduler import Footprint, fits


class RequestError(ValueError):
    """A request the engine cannot run (too long, bad parameters)."""


@dataclass
class EngineConfig:
    max_total_tokens: int = 16384  # KV slots
    max_requests: int = 64  # --running_max_req_size
    max_req_len: int = 8192  # --max_req_total_len: prompt + new tokens
    batch_max_tokens: int = 8192  # prompt tokens prefilled per step (chunk size)
    vit_batch_tiles: int = 64  # tiles per ViT forward


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
        batch, plan = self._build_batch()
        logits = self.llm.forward(batch, self.kv.buffer, self.table.table)
        return self._sample_and_update(logits, plan)

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

    def _build_batch(self) -> tuple[ForwardBatch, list[tuple[Request, bool]]]:
        decodes = [r for r in self.running if r.num_cached >= len(r.prompt_ids)]
        budget = max(self.config.batch_max_tokens - len(decodes), 1)
        ids, positions, slots_all, rows, cu_q, prefix, seq, logit_rows = [], [], [], [], [0], [], [], []
        image_parts, image_index = [], []
        image_base = 0
        plan: list[tuple[Request, bool]] = []
        for r in self.running:
            start = r.num_cached
            if start < len(r.prompt_ids):
                if budget <= 0:
                    continue
                n = min(len(r.prompt_ids) - start, budget)
                budget -= n
                new_ids = r.prompt_ids[start:start + n]
            else:
                n = 1
                new_ids = [r.output_ids[-1]]
            slots = self.kv.alloc(n)
            self.table.append(r.row, start, slots)
            ids.extend(new_ids)
            positions.extend(range(start, start + n))
            slots_all.append(slots)
            idx = [-1] * n
            if r.image_embeds is not None and start < len(r.prompt_ids):
                idx, used = self._image_index(r, start, n, image_base)
                if used is not None:
                    image_parts.append(used)
                    image_base += used.shape[0]
            image_index.extend(idx)
            rows.append(r.row)
            prefix.append(start)
            seq.append(start + n)
            cu_q.append(cu_q[-1] + n)
            r.num_cached = start + n
            produces = r.num_cached == r.num_tokens
            if produces:
                logit_rows.append(cu_q[-1] - 1)
            plan.append((r, produces))
        dev = self.device

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=dev)

        max_q = max(cu_q[i + 1] - cu_q[i] for i in range(len(rows)))
        batch = ForwardBatch(
            input_ids=t(ids, torch.int64), positions=t(positions, torch.int64),
            slots=torch.cat(slots_all).to(dev), req_rows=t(rows, torch.int32), cu_q=t(cu_q, torch.int32),
            prefix_lens=t(prefix, torch.int32), seq_lens=t(seq, torch.int32), max_q_len=max_q,
            max_seq_len=max(seq), logit_rows=t(logit_rows, torch.int64),
            image_rows=torch.cat(image_parts).to(dev, self.llm.dtype) if image_parts else None,
            image_index=t(image_index, torch.int32) if image_parts else None)
        return batch, plan

    @staticmethod
    def _image_index(r: Request, start: int, n: int, base: int) -> tuple[list[int], torch.Tensor | None]:
        """Map this chunk's image tokens to rows of the batch's image tensor."""
        import bisect

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
        token_ids, logprobs = token_ids.tolist(), logprobs.tolist()
        outs = []
        for r, tok, lp in zip(producers, token_ids, logprobs):
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
