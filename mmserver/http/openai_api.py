"""OpenAI-compatible chat routes: POST /v1/chat/completions and GET /v1/models.

A chat request becomes the /generate path's pieces: the prompt rendered with the model's
own chat template (image parts become `<image>` where they stand), one ImageSpec per image
part, and parameters checked by the same `parse_parameters` / `sampling_params`; it then
runs through `requests.prepare` and the same output streams. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` (rendered by `common.error_middleware`).

Where OpenAI's API leaves room (documented in the README):
- greedy unless `temperature` > 0 is given (OpenAI's default is 1): exact, reproducible
  answers by default; `top_p` applies only when sampling;
- no `max_tokens`: generate until a stop token or until max_req_total_len is full;
- `n` > 1: n engine requests; with a `seed` s, choice i uses seed s + i;
- other `image_url` keys are the image's options for the model family (InternVL reads
  LMDeploy's `max_dynamic_patch`, a per-image tile cap; unknown ones are ignored);
- `{"type": "image_embeds", "image_embeds": "<base64 safetensors>"}`: precomputed embeddings
  (Qwen2-VL's also carry `"grid_thw": [t, h, w]`);
- `{"type": "video_url", "video_url": {"url": "http(s)://…" | "data:video/…;base64,…",
  "num_frames": n | "fps": f, …}}`: a video (vLLM / SGLang / LMDeploy's part); other keys are
  the family's options (Qwen2-VL: min_pixels / max_pixels per frame);
- `mm_processor_kwargs` (vLLM's name): the request's image and video options, as /generate's
  parameters (`image_max_patch_num`, `min_pixels`, `max_pixels`, `num_frames`, `fps`);
- vLLM-style extensions: top_k, repetition_penalty, min_tokens, ignore_eos, skip_special_tokens;
  structured outputs by `response_format` or vLLM's `structured_outputs` / `guided_*`;
- `logprobs` / `top_logprobs`: raw log-probabilities (as /generate reports them); a token's
  `token` is its own bytes decoded as UTF-8 (`TokenPieces`), `bytes` those bytes.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..frontend.streams import TokenEvent
from ..models.errors import PromptError
from .common import AppState, json_body
from .openai_common import (GUIDED, PARAM_NAMES, InvalidRequest, chat_logprobs, check_fields, check_model,
                            finish_reason, parse_n, sampling, stream_options, stream_sse, top_logprobs_of, usage)
from .requests import Submission, merged, prepare
from .schemas import IMAGE_OPTIONS, GenerateRequest, ImageSpec, check_image_count, check_video_count

STARTED = int(time.time())

# max_completion_tokens is listed first: it wins over max_tokens
_PARAM_NAMES = {"max_completion_tokens": "max_new_tokens", **PARAM_NAMES}
_FIELDS = {"messages", "model", "stream", "stream_options", "n", "logprobs", "top_logprobs", "mm_processor_kwargs",
           *_PARAM_NAMES, *GUIDED}
# Accepted and ignored: they do not change what is generated.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_ROLES = ("system", "developer", "user", "assistant")
_PART_TYPES = ("text", "image_url", "image_embeds", "video_url")


@dataclass
class ChatRequest:
    generate: GenerateRequest
    n: int
    stream: bool
    include_usage: bool
    fit_to_context: bool  # no max_tokens given: use the room the prompt leaves
    logprobs: bool = False


# ---------------------------------------------------------------------------------------
# Request parsing


def parse_chat(body: Any, state: AppState) -> ChatRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    check_fields(body, _FIELDS, _IGNORED)
    check_model(body)
    stream, include_usage = stream_options(body)
    n = parse_n(body, state.max_n)
    top_logprobs = top_logprobs_of(body)
    messages, media = parse_messages(body.get("messages"))
    images = [m for m in media if m.kind == "image"]
    videos = [m for m in media if m.kind == "video"]
    check_image_count(len(images), state.max_images)
    check_video_count(len(videos), state.max_videos)
    try:
        prompt = state.intake.family.render_chat(messages)
    except PromptError as e:
        raise InvalidRequest(str(e), "messages") from None
    fit = body.get("max_completion_tokens") is None and body.get("max_tokens") is None
    # without max_tokens: lowered to the prompt's room in prepare()
    params, skip_special = sampling(body, _PARAM_NAMES, state.stop_token_ids, state.intake.limits.max_req_len)
    params.top_logprobs = top_logprobs or 0
    req = GenerateRequest(inputs=prompt, params=params, images=images, videos=videos, skip_special_tokens=skip_special,
                          image_options=_media_options(body.get("mm_processor_kwargs")))
    return ChatRequest(req, n, stream, include_usage, fit, top_logprobs is not None)


def _media_options(raw: Any) -> dict[str, Any]:
    """vLLM's `mm_processor_kwargs`: the request's image and video options (as /generate's
    parameters: image_max_patch_num, min_pixels, max_pixels, num_frames, fps); an image part's
    or video part's own keys win. The model family checks the values it reads."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest("mm_processor_kwargs must be an object", "mm_processor_kwargs")
    unknown = sorted(set(raw) - set(IMAGE_OPTIONS))
    if unknown:
        raise InvalidRequest(f"mm_processor_kwargs: unknown key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(IMAGE_OPTIONS)}", "mm_processor_kwargs")
    return dict(raw)


def parse_messages(raw: Any) -> tuple[list[dict], list[ImageSpec]]:
    """Messages with content as text/image/video parts for the chat template, and the images and
    videos in order (each ImageSpec says its kind)."""
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
        if kind == "video_url":
            images.append(_video_url_spec(part.get("video_url"), at))
            parts.append({"type": "video"})  # rendered where it stands, as the family marks a video
            continue
        images.append(_image_url_spec(part.get("image_url"), at) if kind == "image_url"
                      else _embeds_spec(part, at))
        parts.append({"type": "image"})  # rendered as `<image>\n` by the template
    return parts


def _image_url_spec(value: Any, at: str) -> ImageSpec:
    return _url_spec(value, at, "image")


def _video_url_spec(value: Any, at: str) -> ImageSpec:
    return _url_spec(value, at, "video")


def _url_spec(value: Any, at: str, kind: str) -> ImageSpec:
    """An `image_url` / `video_url` object: an http(s) URL or a data:{kind}/…;base64, URL; its other
    keys (max_dynamic_patch, num_frames, fps, max_pixels, …) are the item's options, which the
    model family checks."""
    name = f"{kind}_url"
    obj = {"url": value} if isinstance(value, str) else value
    if not isinstance(obj, dict) or not isinstance(obj.get("url"), str):
        raise InvalidRequest(f"{at}.{name} must be an object with a string 'url'", f"{at}.{name}")
    url = obj["url"]
    is_data = url.startswith(f"data:{kind}/") and ";base64," in url
    if not (is_data or url.startswith(("http://", "https://"))):
        raise InvalidRequest(f"{at}.{name}.url must be an http(s) URL or a data:{kind}/...;base64, URL, "
                             f"got {url[:64]!r}", f"{at}.{name}.url")
    return ImageSpec("url", url, {k: v for k, v in obj.items() if k != "url"}, f"{at}.{name}", kind=kind)


def _embeds_spec(part: dict, at: str) -> ImageSpec:
    value = part.get("image_embeds")
    if not isinstance(value, str):
        raise InvalidRequest(f"{at}.image_embeds must be a string (base64 of a safetensors file)",
                             f"{at}.image_embeds")
    # Other keys (Qwen2-VL's grid_thw) go to the model family with the embeddings.
    return ImageSpec("embeds", value, {k: v for k, v in part.items() if k not in ("type", "image_embeds")}, at)


# ---------------------------------------------------------------------------------------
# Responses


@dataclass
class _Chat:
    id: str
    created: int
    model: str
    prompt_tokens: int
    include_usage: bool = False

    def chunk(self, index: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
        if self.include_usage:
            out["usage"] = None  # only the last chunk carries usage
        return out


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state: AppState = request.config_dict["state"]
    chat = parse_chat(await json_body(request), state)
    subs = await prepare(state, chat.generate, n=chat.n, fit_to_context=chat.fit_to_context,
                         arrival=request.get("arrival"))
    done = _Chat(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name, len(subs[0].serve.input_ids),
                 chat.include_usage)
    # Started at once in either branch, so the streams always release the references.
    async with contextlib.aclosing(merged(state, subs)) as events:
        if chat.stream:
            return await _stream(request, state, events, done, len(subs), chat.logprobs)
        return await _complete(state, events, done, subs, chat.logprobs)


async def _complete(state: AppState, events, done: _Chat, subs: list[Submission], logprobs: bool) -> web.Response:
    last: dict[int, TokenEvent] = {}
    content: list[list[dict]] = [[] for _ in subs]
    async for i, ev in events:
        last[i] = ev
        if logprobs:
            content[i].append(chat_logprobs(state, ev))
    state.streams.counters.outcome("ok")
    choices = [{"index": i, "message": {"role": "assistant", "content": last[i].full_text},
                "logprobs": {"content": content[i]} if logprobs else None,
                "finish_reason": finish_reason(last[i].finish_reason)} for i in range(len(subs))]
    return web.json_response({"id": done.id, "object": "chat.completion", "created": done.created,
                              "model": done.model, "choices": choices,
                              "usage": usage(done.prompt_tokens, sum(ev.count for ev in last.values()),
                                             max(ev.prompt_cache_len for ev in last.values()))})


async def _stream(request: web.Request, state: AppState, events, done: _Chat, n: int,
                  logprobs: bool) -> web.StreamResponse:
    counts = [0] * n
    cached = [0] * n
    held: list[list[dict]] = [[] for _ in range(n)]  # logprobs of tokens whose text is not sent yet

    def take(i: int) -> dict | None:
        if not logprobs:
            return None
        out, held[i] = {"content": held[i]}, []
        return out

    def start() -> list[dict]:
        return [done.chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]

    def on_event(i: int, ev: TokenEvent) -> list[dict]:
        counts[i] = ev.count
        if logprobs:
            held[i].append(chat_logprobs(state, ev))
        cached[i] = ev.prompt_cache_len
        if ev.finished:  # the last text rides with the finish reason; content is always a string
            return [done.chunk(i, {"content": ev.text}, finish_reason(ev.finish_reason), take(i))]
        # a token whose text is held back (partial character, possible stop string) rides with
        # the next chunk, logprobs included
        return [done.chunk(i, {"content": ev.text}, logprobs=take(i))] if ev.text else []

    def end() -> list[dict]:
        if not done.include_usage:
            return []
        return [{"id": done.id, "object": "chat.completion.chunk", "created": done.created, "model": done.model,
                 "choices": [], "usage": usage(done.prompt_tokens, sum(counts), max(cached))}]

    return await stream_sse(request, state, events, start, on_event, end)


async def models(request: web.Request) -> web.Response:
    state: AppState = request.config_dict["state"]
    return web.json_response({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": STARTED, "owned_by": "mmserver",
         "max_model_len": state.intake.limits.max_req_len}]})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_get("/v1/models", models)
