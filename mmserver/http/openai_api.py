"""OpenAI-compatible routes: POST /v1/chat/completions and GET /v1/models.

A chat request becomes the /generate path's pieces: the prompt rendered with the model's
own chat template (image parts become `<image>` where they stand), one ImageSpec per image
part, and parameters checked by the same `parse_parameters` / `sampling_params`; it then
runs through `server.prepare` and the same output streams. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`.

Where OpenAI's API leaves room (documented in the README):
- greedy unless `temperature` > 0 is given (OpenAI's default is 1): exact, reproducible
  answers by default; `top_p` applies only when sampling;
- no `max_tokens`: generate until a stop token or until max_req_total_len is full;
- other `image_url` keys are the image's options for the model family (InternVL reads
  LMDeploy's `max_dynamic_patch`, a per-image tile cap; unknown ones are ignored);
- `{"type": "image_embeds", "image_embeds": "<base64 safetensors>"}`: precomputed embeddings;
- vLLM-style extensions: top_k, repetition_penalty, min_tokens, ignore_eos, skip_special_tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..frontend.errors import BadRequest, HTTPError
from ..frontend.streams import TokenEvent
from ..models.errors import PromptError
from .schemas import GenerateRequest, ImageSpec, ParamError, check_image_count, parse_parameters, sampling_params
from .server import AppState, error_middleware, json_body, prepare

log = logging.getLogger("mmserver.http")

STARTED = int(time.time())

# OpenAI (and vLLM-extension) name → /generate parameter name
_PARAM_NAMES = {
    "max_completion_tokens": "max_new_tokens", "max_tokens": "max_new_tokens", "temperature": "temperature",
    "top_p": "top_p", "stop": "stop_sequences", "seed": "seed", "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty", "n": "n", "top_k": "top_k", "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens", "ignore_eos": "ignore_eos", "skip_special_tokens": "skip_special_tokens",
}
_FIELDS = {"messages", "model", "stream", "stream_options", *_PARAM_NAMES}
# Accepted and ignored: they do not change what is generated.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_ROLES = ("system", "developer", "user", "assistant")
_PART_TYPES = ("text", "image_url", "image_embeds")


class InvalidRequest(BadRequest):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ChatRequest:
    generate: GenerateRequest
    stream: bool
    include_usage: bool
    fit_to_context: bool  # no max_tokens given: use the room the prompt leaves


# ---------------------------------------------------------------------------------------
# Request parsing


def parse_chat(body: Any, state: AppState) -> ChatRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    _check_fields(body)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise InvalidRequest("'model' must be a string", "model")
    stream, include_usage = _stream_options(body)
    messages, images = parse_messages(body.get("messages"))
    check_image_count(len(images), state.max_images)
    try:
        prompt = state.intake.family.render_chat(messages)
    except PromptError as e:
        raise InvalidRequest(str(e), "messages") from None
    fit = body.get("max_completion_tokens") is None and body.get("max_tokens") is None
    params, skip_special = _sampling(body, state.stop_token_ids, state.intake.limits.max_req_len)
    req = GenerateRequest(inputs=prompt, params=params, images=images, skip_special_tokens=skip_special)
    return ChatRequest(req, stream, include_usage, fit)


def _check_fields(body: dict) -> None:
    # A field we do not implement must not be silently dropped if it would change the answer.
    unsupported = sorted(k for k, v in body.items()
                         if k not in _FIELDS and k not in _IGNORED and v is not None and v is not False)
    if unsupported:
        raise InvalidRequest(f"unsupported parameter(s): {', '.join(unsupported)}", unsupported[0])


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"'stream' must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is None:
        return bool(stream), False
    if not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise InvalidRequest("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    return True, opts.get("include_usage", False)


def _sampling(body: dict, stop_token_ids: list[int], max_req_len: int):
    """OpenAI fields → /generate parameters, validated by the /generate code; errors name
    the OpenAI field."""
    raw, given = {}, {}
    for name, internal in _PARAM_NAMES.items():
        if body.get(name) is not None and internal not in raw:  # max_completion_tokens wins over max_tokens
            raw[internal], given[internal] = body[name], name
    raw.setdefault("max_new_tokens", max_req_len)  # lowered to the prompt's room in prepare()
    try:
        p = parse_parameters(raw)
        p["do_sample"] = "temperature" in raw and p["temperature"] > 0
        return sampling_params(p, stop_token_ids), p["skip_special_tokens"]
    except ParamError as e:
        name = given.get(e.param, e.param)
        raise InvalidRequest(f"'{name}' {e.detail}", name) from None


def parse_messages(raw: Any) -> tuple[list[dict], list[ImageSpec]]:
    """Messages with content as text/image parts for the chat template, and the images in order."""
    if raw is None:
        raise InvalidRequest("'messages' is required", "messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty list", "messages")
    messages: list[dict] = []
    images: list[ImageSpec] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object", where)
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(map(repr, _ROLES))}, got {role!r}",
                                 f"{where}.role")
        if role in ("system", "developer"):
            if i != 0:  # the templates have one system slot, at the start
                raise InvalidRequest(f"{where}: a {role} message must be the first message", f"{where}.role")
            role = "system"
        messages.append({"role": role, "content": _parse_content(m.get("content"), where, role, images)})
    return messages, images


def _parse_content(content: Any, where: str, role: str, images: list[ImageSpec]) -> list[dict]:
    if content is None and role == "assistant":
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts", f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _PART_TYPES:
            raise InvalidRequest(f"{at}.type {kind!r} is not one of {', '.join(map(repr, _PART_TYPES))}",
                                 f"{at}.type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{at}.text must be a string", f"{at}.text")
            parts.append({"type": "text", "text": part["text"]})
            continue
        images.append(_image_url_spec(part.get("image_url"), at) if kind == "image_url"
                      else _embeds_spec(part.get("image_embeds"), at))
        parts.append({"type": "image"})  # rendered as `<image>\n` by the template
    return parts


def _image_url_spec(value: Any, at: str) -> ImageSpec:
    obj = {"url": value} if isinstance(value, str) else value
    if not isinstance(obj, dict) or not isinstance(obj.get("url"), str):
        raise InvalidRequest(f"{at}.image_url must be an object with a string 'url'", f"{at}.image_url")
    url = obj["url"]
    is_data = url.startswith("data:image/") and ";base64," in url
    if not (is_data or url.startswith(("http://", "https://"))):
        raise InvalidRequest(f"{at}.image_url.url must be an http(s) URL or a data:image/...;base64, URL, "
                             f"got {url[:64]!r}", f"{at}.image_url.url")
    # Other keys (e.g. max_dynamic_patch) are the image's options: the model family checks them.
    return ImageSpec("url", url, {k: v for k, v in obj.items() if k != "url"}, f"{at}.image_url")


def _embeds_spec(value: Any, at: str) -> ImageSpec:
    if not isinstance(value, str):
        raise InvalidRequest(f"{at}.image_embeds must be a string (base64 of a safetensors file)",
                             f"{at}.image_embeds")
    return ImageSpec("embeds", value)


# ---------------------------------------------------------------------------------------
# Responses


@dataclass
class _Completion:
    id: str
    created: int
    model: str
    prompt_tokens: int

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def chunk(self, delta: dict, finish_reason: str | None = None, include_usage: bool = False) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            out["usage"] = None  # only the last chunk carries usage
        return out


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state: AppState = request.config_dict["state"]
    chat = parse_chat(await json_body(request), state)
    serve, refs = await prepare(state, chat.generate, fit_to_context=chat.fit_to_context,
                                arrival=request.get("arrival"))
    done = _Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name, len(serve.input_ids))
    # The stream starts at once in either branch, so it always releases the references.
    events = state.streams.run(serve, refs, chat.generate.skip_special_tokens)
    if chat.stream:
        return await _stream(request, state, events, done, chat.include_usage)
    return await _complete(state, events, done)


async def _complete(state: AppState, events, done: _Completion) -> web.Response:
    last: TokenEvent | None = None
    async with contextlib.aclosing(events):
        async for ev in events:
            last = ev
    state.streams.counters.outcome("ok")
    return web.json_response({
        "id": done.id, "object": "chat.completion", "created": done.created, "model": done.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": last.full_text},
                     "logprobs": None, "finish_reason": _finish_reason(last.finish_reason)}],
        "usage": done.usage(last.count)})


async def _stream(request: web.Request, state: AppState, events, done: _Completion,
                  include_usage: bool) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def send(payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        await resp.write(f"data: {data}\n\n".encode())

    async with contextlib.aclosing(events):
        ev = await anext(events)  # errors before the first token still get a proper status
        await resp.prepare(request)
        await send(done.chunk({"role": "assistant", "content": ""}, include_usage=include_usage))
        while True:
            if ev.text:
                await send(done.chunk({"content": ev.text}, include_usage=include_usage))
            if ev.finished:
                await send(done.chunk({}, _finish_reason(ev.finish_reason), include_usage))
                if include_usage:
                    await send({"id": done.id, "object": "chat.completion.chunk", "created": done.created,
                                "model": done.model, "choices": [], "usage": done.usage(ev.count)})
                break
            try:
                ev = await anext(events)
            except HTTPError as e:  # a worker failed mid-stream: tell the client in-band
                await send(error_body(e.status, e.message))
                break
    await send("[DONE]")
    state.streams.counters.outcome("ok")
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.Response:
    state: AppState = request.config_dict["state"]
    return web.json_response({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": STARTED, "owned_by": "mmserver",
         "max_model_len": state.intake.limits.max_req_len}]})


# ---------------------------------------------------------------------------------------
# Errors and the sub-application


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


openai_errors = error_middleware(error_body)


def openai_app() -> web.Application:
    """The /v1 routes, mounted by `server.build_app`; they find AppState in the parent app."""
    app = web.Application(middlewares=[openai_errors])
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_get("/models", models)
    return app
