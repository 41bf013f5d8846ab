"""HTTP routes (aiohttp): /generate, /generate_stream, /tokens, /health, /metrics; the
OpenAI-compatible /v1 routes live in `openai_api.py` and reuse `json_body` and `prepare`."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from ..engine.sampling import SamplingParams
from ..frontend.errors import BadRequest, HTTPError, Overloaded, TooLarge, Unavailable
from ..frontend.intake import Intake
from ..frontend.streams import Streams
from ..ipc import ServeRequest
from .metrics import render_metrics
from .schemas import GenerateRequest, parse_generate

log = logging.getLogger("mmserver.http")



@dataclass
class AppState:
    intake: Intake
    streams: Streams
    stop_token_ids: list[int]
    max_images: int
    max_waiting: int
    model_name: str
    multimodal: bool
    health: Callable[[], str | None]  # None when healthy, else the reason
    stats: dict[str, dict]


def outcome_of(status: int) -> str:
    """The /metrics outcome label of a request that ended with an error `status`."""
    return "rejected" if status < 500 else ("overloaded" if status == 503 else "failed")


def error_middleware(render: Callable[[int, str, str | None], dict]):
    """Turn HTTPError (and, as a 500, any bug) into JSON `render(status, message, param)`,
    counting the outcome; the server keeps serving either way."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        counters = request.config_dict["state"].streams.counters
        request["arrival"] = time.monotonic()  # TTFT breakdown: the body's upload and parse count as intake
        try:
            return await handler(request)
        except HTTPError as e:
            counters.outcome(outcome_of(e.status))
            return web.json_response(render(e.status, e.message, getattr(e, "param", None)), status=e.status)
        except web.HTTPException:
            raise
        except Exception as e:  # a bug must not take the server down; the client gets a 500
            log.exception("internal error on %s", request.path)
            counters.outcome("failed")
            return web.json_response(render(500, f"internal error: {type(e).__name__}: {e}", None), status=500)

    return middleware


errors_middleware = error_middleware(lambda status, message, param: {"message": message})


async def json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except json.JSONDecodeError as e:
        raise BadRequest(f"invalid JSON body: {e}") from None
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8") from None
    except web.HTTPRequestEntityTooLarge as e:
        raise TooLarge(f"request body too large ({e.text})") from None


async def prepare(state: AppState, req: GenerateRequest, fit_to_context: bool = False,
                  arrival: float | None = None) -> tuple[ServeRequest, list]:
    """Validate, load images, tokenize and take cache references (released by the stream).

    With `fit_to_context`, max_new_tokens is lowered to the room the prompt leaves in
    max_req_total_len (OpenAI's "no max_tokens given")."""
    if (reason := state.health()) is not None:
        raise Unavailable(f"server unhealthy: {reason}")
    if state.streams.in_flight >= state.max_waiting:
        raise Overloaded(f"server overloaded: {state.streams.in_flight} requests in flight")
    if req.images and not state.multimodal:
        raise BadRequest("images were sent but the server was started without --enable_multimodal")
    images = await state.intake.load_images(req.images, req.image_options)
    ids, spans = state.intake.tokenize(req.inputs, images)
    if fit_to_context:
        _fit_max_new_tokens(req.params, len(ids), state.intake.limits.max_req_len)
    state.intake.check_length(len(ids), req.params.max_new_tokens)
    refs = await state.intake.take_cache_refs(images)
    serve = ServeRequest(state.streams.new_id(), ids, req.params, refs, spans,
                         t_arrival=arrival if arrival is not None else time.monotonic())
    return serve, refs


def _fit_max_new_tokens(params: SamplingParams, n_prompt: int, max_req_len: int) -> None:
    room = max_req_len - n_prompt
    if room >= 1:  # otherwise check_length names the problem
        params.max_new_tokens = min(params.max_new_tokens, room)
        params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)


async def generate(request: web.Request) -> web.Response:
    state: AppState = request.app["state"]
    req = parse_generate(await json_body(request), state.stop_token_ids, state.max_images)
    serve, refs = await prepare(state, req, arrival=request.get("arrival"))
    tokens = []
    last = None
    async with contextlib.aclosing(state.streams.run(serve, refs, req.skip_special_tokens)) as events:
        async for ev in events:
            last = ev
            if req.return_details:
                tokens.append({"id": ev.id, "text": state.streams.token_text(ev.id), "logprob": ev.logprob,
                               "special": ev.special})
    state.streams.counters.outcome("ok")
    body = {"generated_text": [last.full_text], "count_output_tokens": last.count,
            "finish_reason": last.finish_reason, "prompt_tokens": len(serve.input_ids)}
    if req.return_details:
        body["tokens"] = tokens
    return web.json_response(body)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    state: AppState = request.app["state"]
    req = parse_generate(await json_body(request), state.stop_token_ids, state.max_images)
    serve, refs = await prepare(state, req, arrival=request.get("arrival"))
    events = state.streams.run(serve, refs, req.skip_special_tokens)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    async with contextlib.aclosing(events):
        first = await anext(events)  # errors before the first token still get a proper status
        await resp.prepare(request)
        ev = first
        while True:
            payload = {"token": {"id": ev.id, "text": ev.text, "logprob": ev.logprob, "special": ev.special,
                                 "count_output_tokens": ev.count, "prompt_tokens": len(serve.input_ids)},
                       "generated_text": ev.full_text if ev.finished else None,
                       "finished": ev.finished, "finish_reason": ev.finish_reason}
            await resp.write(b"data:" + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
            if ev.finished:
                break
            try:
                ev = await anext(events)
            except HTTPError as e:  # a worker failed mid-stream: tell the client in-band
                await resp.write(b"data:" + json.dumps({"error": e.message, "finished": True}).encode() + b"\n\n")
                break
    state.streams.counters.outcome("ok")
    await resp.write_eof()
    return resp


async def tokens(request: web.Request) -> web.Response:
    """Prompt token count, images included (LightLLM's /tokens)."""
    state: AppState = request.app["state"]
    body = await json_body(request)
    req = parse_generate({**body, "parameters": body.get("parameters") or {}} if isinstance(body, dict) else body,
                         state.stop_token_ids, state.max_images)
    images = await state.intake.load_images(req.images, req.image_options)
    return web.json_response({"ntokens": len(state.intake.tokenize(req.inputs, images)[0])})


async def health(request: web.Request) -> web.Response:
    reason = request.app["state"].health()
    if reason is None:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unhealthy", "message": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    state: AppState = request.app["state"]
    cache_stats = {}
    if state.intake.cache is not None and state.health() is None:
        cache_stats = await state.intake.cache_call(state.intake.cache.stats)
    text = render_metrics(state.streams.counters, state.stats.get("router", {}), state.stats.get("visual", {}),
                          cache_stats, state.streams.in_flight)
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def build_app(state: AppState, max_request_bytes: int) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=max_request_bytes)
    app["state"] = state
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/tokens", tokens)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    from .openai_api import openai_app  # imported here: openai_api builds on this module
    app.add_subapp("/v1", openai_app())
    return app
