"""The router process: request queue, admission and continuous batching around the engine.

Tensor-parallel rank 0 of the model lives here, at any --tp (the other ranks follow its
batches from their own processes). Requests arrive from the HTTP server (text-only and fully
cached ones) and from the visual server (once their images are encoded), each request's
abort on the same pipe after it; every step's new tokens go back to the HTTP server in one
message.
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection, wait
from typing import Callable

import torch

from ..args import ServerArgs
from ..embed_cache import shm
from ..engine.engine import Engine, RequestError
from ..ipc import Abort, Failure, FromRouter, Outputs, RouterStats, Sender, ServeRequest, Submit, ToRouter
from .sizing import engine_config_for

log = logging.getLogger("mmserver.router")

STATS_INTERVAL_S = 0.2


class Router:
    """Feeds requests and aborts to the engine and sends its tokens on.

    An abort always arrives after its request (ipc.py), so an abort for an id the engine
    does not hold means the request already finished: it is ignored and nothing is kept."""

    def __init__(self, engine: Engine, out: Sender[FromRouter], hidden: int, dtype: torch.dtype,
                 rope_inputs: Callable[..., dict] | None = None):
        self.engine = engine
        self.out = out
        # the model family's RoPE keywords of a prompt ({} for plain 0..L-1 positions)
        self.rope_inputs = rope_inputs or (lambda ids, spans, grids: {})
        self.hidden = hidden
        self.dtype = dtype
        self.awaiting_first: dict[int, float] = {}  # req id → when it was sent here (TTFT breakdown)
        self.first_token_s = 0.0
        self.first_tokens = 0

    def handle(self, msg: ToRouter) -> None:
        match msg:
            case Submit(req):
                self._add(req)
            case Abort(req_id):
                self.awaiting_first.pop(req_id, None)
                self.engine.abort(req_id)
            case _:
                raise TypeError(f"router: unexpected message {msg!r}")

    def _add(self, req: ServeRequest) -> None:
        try:
            embeds = self._read_embeddings(req)
            rope = self.rope_inputs(req.input_ids, req.image_spans, [r.grid for r in req.images])
            self.engine.add_request(req.input_ids, req.params, image_embeds=embeds, image_spans=req.image_spans,
                                    image_keys=req.image_keys if req.images else None, req_id=req.req_id, **rope)
            self.awaiting_first[req.req_id] = req.t_sent
        except (RequestError, ValueError, FileNotFoundError) as e:
            self.out.send(Failure(req.req_id, "error", str(e)))

    def _read_embeddings(self, req: ServeRequest) -> torch.Tensor | None:
        if not req.images:
            return None
        parts = []
        for ref in req.images:
            seg = shm.attach(ref.emb_name)
            try:
                parts.append(shm.tensor_view(seg, (ref.n_tokens, self.hidden), self.dtype).clone())
            finally:
                seg.close()
        return torch.cat(parts)

    def step(self) -> None:
        outs = self.engine.step()
        if outs:
            if self.awaiting_first:
                now = time.monotonic()
                for o in outs:
                    sent = self.awaiting_first.pop(o.req_id, None)
                    if sent is not None:
                        self.first_token_s += now - sent
                        self.first_tokens += 1
            self.out.send(Outputs.of(outs))

    def stats(self) -> RouterStats:
        e = self.engine
        stats = RouterStats(kv_used=e.kv.used, kv_total=e.kv.num_slots, waiting=len(e.waiting),
                            running=len(e.running), ttft_router_s=self.first_token_s, ttft_router_n=self.first_tokens)
        if (cache := e.prefix_cache) is not None:
            stats.prompt_cache_hit_tokens = cache.hit_tokens
            stats.prompt_cache_tokens = cache.size
            stats.prompt_cache_evicted_tokens = cache.evicted_tokens
        return stats


def _load_llm(args: ServerArgs, tp_rank: int, init_method: str):
    """Join the tensor-parallel group (if any) and load this rank's shard of the LLM."""
    from ..models.parallel import init_tp
    from ..models.registry import load_family
    device = args.resolved_device
    tp = init_tp(tp_rank, args.tp, init_method)
    if device == "cuda":  # this node's GPUs hold its ranks in order (--nnodes: tp / nnodes ranks per node)
        torch.cuda.set_device((tp_rank % (args.tp // args.nnodes)) % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    family = load_family(args.model_dir)
    dtype = args.compute_dtype(family.config.torch_dtype)
    weights = family.load_weights(device, dtype, tp, components=("llm",), progress=False, workers=args.load_workers)
    llm = family.build_llm(weights, tp=tp if tp.size > 1 else None)
    engine_cfg = engine_config_for(args, llm)
    if tp.size > 1:  # every rank's pool must have the same slots: the smallest one's
        import torch.distributed as dist

        slots = torch.tensor([engine_cfg.max_total_tokens], dtype=torch.int64, device=llm.device)
        dist.all_reduce(slots, op=dist.ReduceOp.MIN, group=tp.group)
        engine_cfg.max_total_tokens = int(slots.item())
        engine_cfg.max_req_len = min(engine_cfg.max_req_len, engine_cfg.max_total_tokens)
    return family, llm, tp, engine_cfg, dtype


def run_router(ready, args: ServerArgs, from_http: Connection, from_visual: Connection | None, to_http: Connection,
               init_method: str = "") -> None:
    """Process entry (tp rank 0): load the LLM, size the KV pool, report ready, then loop forever."""
    from ..engine.tp import TPLeader

    family, llm, tp, engine_cfg, dtype = _load_llm(args, 0, init_method)
    model = TPLeader(llm, tp) if tp.size > 1 else llm
    # The tokenizer is loaded only if a request asks for structured output (its grammar is
    # compiled for this tokenizer and the LM head's vocabulary).
    engine = Engine(model, engine_cfg, tokenizer=lambda: family.tokenizer)
    router = Router(engine, to_http, family.config.llm.hidden_size, dtype, family.rope_inputs)
    ready({"kv_slots": engine_cfg.max_total_tokens, "max_req_len": engine_cfg.max_req_len})
    try:
        # A text-only server has no visual process: its pipe would read as closed at once.
        serve_forever(router, [c for c in (from_http, from_visual) if c is not None])
    finally:
        if tp.size > 1:
            model.stop()


def run_model_worker(ready, args: ServerArgs, tp_rank: int, init_method: str) -> None:
    """Process entry (tp rank > 0): run rank 0's batches on this rank's shard until it stops."""
    from ..engine.kv_pool import allocate_kv
    from ..engine.tp import follow

    _, llm, tp, engine_cfg, _ = _load_llm(args, tp_rank, init_method)
    kv, table = allocate_kv(llm, engine_cfg)  # rank 0's shapes, scratch slot and pad cell included
    ready()
    follow(llm, kv.buffer, table.table, tp)


def serve_forever(router: Router, inputs: list[Connection]) -> None:
    engine = router.engine
    last_stats = 0.0
    while True:
        timeout = 0 if engine.has_work() else STATS_INTERVAL_S
        for conn in wait(inputs, timeout):
            while conn.poll():
                try:
                    router.handle(conn.recv())
                except EOFError:  # the HTTP server is gone: nothing left to serve
                    return
        if engine.has_work():
            router.step()
        now = time.monotonic()
        if now - last_stats >= STATS_INTERVAL_S:
            router.out.send(router.stats())
            last_stats = now
