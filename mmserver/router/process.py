"""The router process: request queue, admission and continuous batching around the engine.

With --tp 1 the model worker lives here. Inputs arrive from the HTTP server (text-only
and fully cached requests, aborts) and from the visual server (requests whose images were
just encoded); every step's new tokens go back to the HTTP server in one message.
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
from ..ipc import ServeRequest, TokenOut
from .sizing import engine_config_for

log = logging.getLogger("mmserver.router")

STATS_INTERVAL_S = 0.2
MAX_REMEMBERED_ABORTS = 10000


class Router:
    def __init__(self, engine: Engine, out_conn: Connection, hidden: int, dtype: torch.dtype,
                 rope_inputs: Callable[..., dict] | None = None):
        self.engine = engine
        # the model family's RoPE keywords of a prompt ({} for plain 0..L-1 positions)
        self.rope_inputs = rope_inputs or (lambda ids, spans, grids: {})
        self.out = out_conn
        self.hidden = hidden
        self.dtype = dtype
        self.steps = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.aborted: set[int] = set()
        self.awaiting_first: dict[int, float] = {}  # req id → when it was sent here (TTFT breakdown)
        self.first_token_s = 0.0
        self.first_tokens = 0

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "req":
            self._add(msg[1])
        elif kind == "abort":
            self.awaiting_first.pop(msg[1], None)
            if msg[1] in self.engine.requests:
                self.engine.abort(msg[1])
            elif len(self.aborted) < MAX_REMEMBERED_ABORTS:
                self.aborted.add(msg[1])  # still on its way through the visual server
        elif kind == "fail":  # the visual server could not encode an image; msg[2] is the finish reason
            self.out.send(("out", [(msg[1], -1, 0.0, True, msg[2])]))

    def _add(self, req: ServeRequest) -> None:
        if req.req_id in self.aborted:
            self.aborted.discard(req.req_id)
            return
        try:
            embeds = self._read_embeddings(req)
            rope = self.rope_inputs(req.input_ids, req.image_spans, [r.grid for r in req.images])
            self.engine.add_request(req.input_ids, req.params, image_embeds=embeds, image_spans=req.image_spans,
                                    req_id=req.req_id, **rope)
            self.prompt_tokens += len(req.input_ids)
            self.awaiting_first[req.req_id] = req.t_sent
        except (RequestError, ValueError, FileNotFoundError) as e:
            self.out.send(("out", [(req.req_id, -1, 0.0, True, f"error:{e}")]))

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
            self.steps += 1
            self.generated_tokens += len(outs)
            batch: list[TokenOut] = [(o.req_id, o.token_id, o.logprob, o.finished, o.finish_reason) for o in outs]
            self.out.send(("out", batch))

    def stats(self) -> dict:
        e = self.engine
        return {"kv_used": e.kv.used, "kv_total": e.kv.num_slots, "waiting": len(e.waiting),
                "running": len(e.running), "steps": self.steps, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "ttft_router_s": self.first_token_s,
                "ttft_router_n": self.first_tokens}


def _load_llm(args: ServerArgs, tp_rank: int, init_method: str):
    """Join the tensor-parallel group (if any) and load this rank's shard of the LLM."""
    from ..engine.tp import init_tp
    from ..models.registry import load_family
    device = args.resolved_device
    tp = init_tp(tp_rank, args.tp, init_method)
    if device == "cuda":
        torch.cuda.set_device(tp_rank % torch.cuda.device_count())
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


def run_router(ready, args: ServerArgs, from_http: Connection, from_visual: Connection, to_http: Connection,
               init_method: str = "") -> None:
    """Process entry (tp rank 0): load the LLM, size the KV pool, report ready, then loop forever."""
    from ..engine.tp import TPLeader

    family, llm, tp, engine_cfg, dtype = _load_llm(args, 0, init_method)
    model = TPLeader(llm, tp) if tp.size > 1 else llm
    engine = Engine(model, engine_cfg)
    router = Router(engine, to_http, family.config.llm.hidden_size, dtype, family.rope_inputs)
    ready({"kv_slots": engine_cfg.max_total_tokens, "max_req_len": engine_cfg.max_req_len})
    try:
        serve_forever(router, [from_http, from_visual], to_http)
    finally:
        if tp.size > 1:
            model.stop()


def run_model_worker(ready, args: ServerArgs, tp_rank: int, init_method: str) -> None:
    """Process entry (tp rank > 0): run rank 0's batches on this rank's shard until it stops."""
    from ..engine.tp import follow

    _, llm, tp, engine_cfg, _ = _load_llm(args, tp_rank, init_method)
    kv_pool = torch.zeros(llm.kv_shape(engine_cfg.max_total_tokens), dtype=llm.dtype, device=llm.device)
    token_table = torch.zeros((engine_cfg.max_requests, engine_cfg.max_req_len), dtype=torch.int32,
                              device=llm.device)
    ready()
    follow(llm, kv_pool, token_table, tp)


def serve_forever(router: Router, inputs: list[Connection], to_http: Connection) -> None:
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
            to_http.send(("stats", router.stats()))
            last_stats = now
