"""The encoder-only server's HTTP side (`--run_mode visual_only`): POST /encode, /health, /metrics.

Each image of an /encode call (file bytes + the family's option string, wire format in
`visual/remote.py`) takes a reference on a record of this server's own embedding cache, like
an image of a /generate request does on a full server: a cached image is answered from
shared memory, a new one goes to this server's visual process (ViT workers, batching across
calls, one encoding however many calls wait for it). The family computes the token count
from the image's header and options; the answer carries [n_tokens, hidden] rows in the
model's dtype. With --api_key, /encode needs `Authorization: Bearer KEY` (the LLM server
sends its own key).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from aiohttp import web

from ..embed_cache import shm
from ..embed_cache.service import CacheClient
from ..engine.sampling import SamplingParams
from ..frontend import images as image_io
from ..frontend.errors import BadRequest, HTTPError, Unavailable
from ..frontend.streams import Counters
from ..ipc import Abort, Failure, ImageRef, ServeRequest, Submit, VisualStats
from ..models.family import is_video_options
from ..visual.remote import DTYPE_NAMES, pack, unpack
from .app import serve_until_signal
from .auth import auth_middleware
from .metrics import CONTENT_TYPE, ServerMetrics, Snapshot

log = logging.getLogger("mmserver.encoder")



class EncoderService:
    """The /encode calls in flight, and the messages of the visual process that end them."""

    def __init__(self, family, cache: CacheClient, to_visual, dtype, max_images: int, max_image_bytes: int,
                 cache_wait_s: float):
        self.family = family
        self.cache = cache
        self.to_visual = to_visual
        self.dtype = dtype
        self.hidden = family.config.llm.hidden_size
        self.max_images = max_images
        self.max_image_bytes = max_image_bytes
        self.cache_wait_s = cache_wait_s
        self.waiting: dict[int, asyncio.Future] = {}  # visual request id → its outcome (None: encoded)
        self.ids = itertools.count(1)
        self.decode_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-decode")
        self.cache_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-client")
        self.failure: str | None = None
        self.stats: dict = {}
        self.counters = Counters()

    def on_message(self, msg) -> None:
        match msg:
            case Submit(req):  # the visual server forwards a request once its image is encoded
                self._end(req.req_id, None)
            case Failure(req_id, kind, message):
                self._end(req_id, (kind, message))
            case VisualStats() as s:
                self.stats = dataclasses.asdict(s)
            case Abort():
                pass  # an abort of a request already forwarded: nothing holds it here
            case _:
                raise TypeError(f"from the visual process: unexpected message {msg!r}")

    def _end(self, req_id: int, outcome) -> None:
        fut = self.waiting.pop(req_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def fail_all(self, reason: str) -> None:
        self.failure = self.failure or reason
        for req_id in list(self.waiting):
            self._end(req_id, ("unavailable", reason))

    async def encode_one(self, data: bytes, options: str) -> tuple[dict, bytes]:
        loop = asyncio.get_running_loop()
        try:
            if is_video_options(options):  # a video's header: frame count, rate, size
                loaded = await loop.run_in_executor(self.decode_pool, image_io.inspect_video, data, 0)
                plan = self.family.plan_video(loaded.meta, options)
            else:
                if len(data) > self.max_image_bytes:
                    raise BadRequest(f"{len(data)} bytes exceeds the {self.max_image_bytes}-byte limit")
                loaded = await loop.run_in_executor(self.decode_pool, image_io.inspect, data, 0)
                plan = self.family.plan_image(loaded.width, loaded.height, options)
        except HTTPError as e:
            return {"status": "invalid", "message": e.message}, b""
        except Exception as e:  # the option string does not parse for this family
            return {"status": "invalid", "message": f"options {options!r}: {type(e).__name__}: {e}"}, b""
        items = [(f"{loaded.md5}:{options}", plan.n_tokens, len(data))]
        deadline = loop.time() + self.cache_wait_s
        while (got := (await loop.run_in_executor(self.cache_pool, self.cache.alloc_many, [items]))[0]) is None:
            if loop.time() >= deadline:
                return {"status": "unavailable", "message": "the encoder's embedding cache is full of images in use"}, b""
            await asyncio.sleep(0.05)
        [(rid, emb_name, img_name, has_emb)] = got
        ref = ImageRef(rid, emb_name, img_name, plan.n_tokens, len(data), not has_emb, options, plan.grid)
        try:
            if ref.needs_vit:
                ref.needs_vit = await loop.run_in_executor(self.decode_pool, _write_image, ref, data)
            if ref.needs_vit:
                outcome = await self._encode(ref)
                if outcome is not None:
                    kind, message = outcome
                    return {"status": kind, "message": message}, b""
            size = plan.n_tokens * self.hidden * self.dtype.itemsize
            rows = await loop.run_in_executor(self.decode_pool, _read, emb_name, size)
            return {"status": "ok", "n_tokens": plan.n_tokens}, rows
        finally:
            await loop.run_in_executor(self.cache_pool, self.cache.release, [rid])

    async def _encode(self, ref: ImageRef):
        req_id = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[req_id] = fut
        now = time.monotonic()
        self.to_visual.send(Submit(ServeRequest(req_id, [], SamplingParams(), [ref], t_arrival=now, t_sent=now)))
        try:
            return await fut
        except asyncio.CancelledError:  # the caller went away: the visual server drops the job if nobody else waits
            if self.waiting.pop(req_id, None) is not None:
                self.to_visual.send(Abort(req_id))
            raise

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.cache_pool.shutdown(wait=False, cancel_futures=True)


def _write_image(ref: ImageRef, data: bytes) -> bool:
    """The image bytes into the record's segment; False when it is gone (just encoded for another call)."""
    try:
        seg = shm.attach(ref.img_name)
    except FileNotFoundError:
        return False
    try:
        seg.buf[:len(data)] = data
    finally:
        seg.close()
    return True


def _read(name: str, size: int) -> bytes:
    seg = shm.attach(name)
    try:
        return bytes(seg.buf[:size])
    finally:
        seg.close()


# ---------------------------------------------------------------------------------------
# Routes


async def encode(request: web.Request) -> web.Response:
    svc: EncoderService = request.config_dict["encoder"]
    if svc.failure is not None:
        raise Unavailable(f"encoder unhealthy: {svc.failure}")
    try:
        meta, blob = unpack(await request.read())
        specs = meta["images"]
        if not isinstance(specs, list) or not all(isinstance(s, dict) and isinstance(s.get("options"), str)
                                                  and isinstance(s.get("bytes"), int) and s["bytes"] >= 0
                                                  for s in specs):
            raise ValueError("'images' must be a list of {'options': str, 'bytes': int}")
        if sum(s["bytes"] for s in specs) != len(blob):
            raise ValueError("the image sizes do not add up to the payload")
    except (ValueError, KeyError) as e:
        raise BadRequest(f"malformed /encode body: {e}") from None
    if len(specs) > svc.max_images:
        raise BadRequest(f"{len(specs)} images in one call, at most {svc.max_images}")
    chunks, offset = [], 0
    for s in specs:
        chunks.append(bytes(blob[offset:offset + s["bytes"]]))
        offset += s["bytes"]
    results = await asyncio.gather(*(svc.encode_one(c, s["options"]) for c, s in zip(chunks, specs)))
    svc.counters.outcome("ok")
    body = pack({"dtype": DTYPE_NAMES[svc.dtype], "hidden": svc.hidden, "images": [m for m, _ in results]},
                [p for _, p in results])
    return web.Response(body=body, content_type="application/octet-stream")


async def health(request: web.Request) -> web.Response:
    reason = request.config_dict["health"]()
    if reason is None:
        return web.json_response({"status": "ok", "run_mode": "visual_only"})
    return web.json_response({"status": "unhealthy", "message": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    svc: EncoderService = request.config_dict["encoder"]
    cache_stats = {}
    if request.config_dict["health"]() is None:
        cache_stats = await asyncio.get_running_loop().run_in_executor(svc.cache_pool, svc.cache.stats)
    body = request.config_dict["metrics"].render(Snapshot(svc.counters, {}, svc.stats, cache_stats,
                                                          len(svc.waiting)))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except HTTPError as e:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return web.json_response({"message": e.message}, status=e.status, headers=headers)


def build_encoder_app(svc: EncoderService, health_fn, api_key: str | None, max_request_bytes: int) -> web.Application:
    app = web.Application(middlewares=[_errors, auth_middleware], client_max_size=max_request_bytes)
    app["state"] = SimpleNamespace(api_key=api_key)  # what auth_middleware reads
    app["encoder"] = svc
    app["health"] = health_fn
    app["metrics"] = ServerMetrics()
    app.router.add_post("/encode", encode)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_encoder(args, cluster, family, ends: dict) -> None:
    """The encoder-only server's HTTP process, until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    cache = CacheClient(ends["cache_socket"])
    svc = EncoderService(family, cache, ends["to_visual"], args.compute_dtype(family.config.torch_dtype),
                         args.max_images_per_request * 4, args.max_image_bytes, args.cache_wait_s)
    conn = ends["from_visual"]

    def drain() -> None:
        try:
            while conn.poll():
                svc.on_message(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            svc.fail_all("visual process is gone")

    loop.add_reader(conn.fileno(), drain)

    def health_fn() -> str | None:
        return svc.failure or cluster.dead()

    app = build_encoder_app(svc, health_fn, args.api_key, args.max_request_bytes)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=3.0)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"mmserver encoder (visual_only) ready on http://{args.host}:{args.port}", flush=True)
    try:
        await serve_until_signal(cluster.dead, lambda: svc.failure is not None, svc.fail_all, log)
    finally:
        await runner.cleanup()
        svc.close()
        cache.close()
