"""LightLLM's routes: /generate, /generate_stream, /tokens, plus /health and /metrics."""

from __future__ import annotations

import contextlib
import json

from aiohttp import web

from ..frontend.errors import HTTPError
from .common import AppState, json_body
from .metrics import CONTENT_TYPE, Snapshot
from .requests import merged, prepare
from .schemas import parse_generate


def _top(state: AppState, ev) -> list[dict]:
    """A token's top_logprobs alternatives as /generate reports them."""
    return [{"id": i, "text": state.streams.token_text(i), "logprob": lp} for i, lp in ev.top or ()]


async def generate(request: web.Request) -> web.Response:
    state: AppState = request.config_dict["state"]
    req = parse_generate(await json_body(request), state.stop_token_ids, state.max_images, state.max_videos)
    [sub] = await prepare(state, req, arrival=request.get("arrival"))
    tokens = []
    last = None
    async with contextlib.aclosing(merged(state, [sub])) as events:
        async for _, ev in events:
            last = ev
            if req.return_details:
                tokens.append({"id": ev.id, "text": state.streams.token_text(ev.id), "logprob": ev.logprob,
                               "special": ev.special})
                if req.params.top_logprobs:
                    tokens[-1]["top_logprobs"] = _top(state, ev)
    state.streams.counters.outcome("ok")
    body = {"generated_text": [last.full_text], "count_output_tokens": last.count,
            "finish_reason": last.finish_reason, "prompt_tokens": len(sub.serve.input_ids),
            "prompt_cache_len": last.prompt_cache_len}
    if req.return_details:
        body["tokens"] = tokens
    return web.json_response(body)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    state: AppState = request.config_dict["state"]
    req = parse_generate(await json_body(request), state.stop_token_ids, state.max_images, state.max_videos)
    [sub] = await prepare(state, req, arrival=request.get("arrival"))
    n_prompt = len(sub.serve.input_ids)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    async with contextlib.aclosing(merged(state, [sub])) as events:
        _, ev = await anext(events)  # errors before the first token still get a proper status
        await resp.prepare(request)
        while True:
            token = {"id": ev.id, "text": ev.text, "logprob": ev.logprob, "special": ev.special,
                     "count_output_tokens": ev.count, "prompt_tokens": n_prompt}
            if req.params.top_logprobs:
                token["top_logprobs"] = _top(state, ev)
            payload = {"token": token,
                       "generated_text": ev.full_text if ev.finished else None,
                       "finished": ev.finished, "finish_reason": ev.finish_reason}
            if ev.finished:
                payload["prompt_cache_len"] = ev.prompt_cache_len
            await resp.write(b"data:" + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
            if ev.finished:
                break
            try:
                _, ev = await anext(events)
            except HTTPError as e:  # a worker failed mid-stream: tell the client in-band
                await resp.write(b"data:" + json.dumps({"error": e.message, "finished": True}).encode() + b"\n\n")
                break
    state.streams.counters.outcome("ok")
    await resp.write_eof()
    return resp


async def tokens(request: web.Request) -> web.Response:
    """Prompt token count, images included (LightLLM's /tokens)."""
    state: AppState = request.config_dict["state"]
    body = await json_body(request)
    req = parse_generate({**body, "parameters": body.get("parameters") or {}} if isinstance(body, dict) else body,
                         state.stop_token_ids, state.max_images, state.max_videos)
    images = await state.intake.load_images(req.images, req.image_options)
    videos = await state.intake.load_videos(req.videos, req.image_options)
    return web.json_response({"ntokens": len(state.intake.tokenize(req.inputs, images, videos).ids)})


async def health(request: web.Request) -> web.Response:
    state: AppState = request.config_dict["state"]
    reason = state.health()
    details = state.health_details() if state.health_details is not None else {}
    if reason is None:
        return web.json_response({"status": "ok", **details})
    return web.json_response({"status": "unhealthy", "message": reason, **details}, status=503)


async def metrics(request: web.Request) -> web.Response:
    state: AppState = request.config_dict["state"]
    cache_stats = {}
    if state.intake.cache is not None and state.health() is None:
        cache_stats = await state.intake.cache_call(state.intake.cache.stats)
    body = state.metrics.render(Snapshot(state.streams.counters, state.stats.get("router", {}),
                                         state.stats.get("visual", {}), cache_stats, state.streams.in_flight))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/generate", generate)
    router.add_post("/generate_stream", generate_stream)
    router.add_post("/tokens", tokens)
    router.add_get("/health", health)
    router.add_get("/metrics", metrics)
