"""Pieces the OpenAI routes (/v1/chat/completions, /v1/completions) share: field checks,
OpenAI parameters → /generate parameters, `n`, and the Server-Sent Events response."""

from __future__ import annotations

import json
import math
from typing import Any, AsyncIterator, Callable, Iterable

from aiohttp import web

from ..engine.sampling import MAX_TOP_LOGPROBS, SamplingParams
from ..frontend.errors import BadRequest, HTTPError
from ..frontend.streams import TokenEvent
from .common import AppState, openai_error
from .schemas import ParamError, parse_parameters, sampling_params

# OpenAI (and vLLM-extension) name → /generate parameter name, common to both routes
PARAM_NAMES = {
    "max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "stop": "stop_sequences",
    "seed": "seed", "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
    "top_k": "top_k", "repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens",
    "ignore_eos": "ignore_eos", "skip_special_tokens": "skip_special_tokens",
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs (and GUIDED below)
    "response_format": "response_format", "structured_outputs": "structured_outputs",
}
# vLLM's older top-level names of structured_outputs' keys
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class InvalidRequest(BadRequest):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _is_set(value: Any) -> bool:
    return value is not None and value is not False and value != {} and value != []


def check_fields(body: dict, known: Iterable[str], ignored: Iterable[str]) -> None:
    """A field we do not implement must not be silently dropped if it would change the answer."""
    allowed = set(known) | set(ignored)
    unsupported = sorted(k for k, v in body.items() if k not in allowed and _is_set(v))
    if unsupported:
        raise InvalidRequest(f"unsupported parameter(s): {', '.join(unsupported)}", unsupported[0])


def check_model(body: dict) -> None:
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise InvalidRequest("'model' must be a string", "model")


def stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)"""
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


def parse_n(body: dict, max_n: int) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise InvalidRequest(f"'n' must be an integer in [1, {max_n}] (--max_n), got {n!r}", "n")
    return n


def sampling(body: dict, names: dict[str, str], stop_token_ids: list[int],
             default_max_tokens: int) -> tuple[SamplingParams, bool]:
    """OpenAI fields → /generate parameters, validated by the /generate code; errors name the
    OpenAI field. Greedy unless `temperature` > 0 is given (reproducible by default)."""
    raw, given = {}, {}
    for name, internal in names.items():
        if body.get(name) is not None and internal not in raw:  # the first name listed wins
            raw[internal], given[internal] = body[name], name
    raw.setdefault("max_new_tokens", default_max_tokens)
    guided = {k: body[k] for k in GUIDED if body.get(k) is not None}
    if guided:
        if "structured_outputs" in raw:
            raise InvalidRequest(f"'{next(iter(guided))}' cannot be combined with 'structured_outputs'",
                                 next(iter(guided)))
        raw["structured_outputs"], given["structured_outputs"] = guided, next(iter(guided))
    try:
        p = parse_parameters(raw)
        p["do_sample"] = "temperature" in raw and p["temperature"] > 0
        return sampling_params(p, stop_token_ids), p["skip_special_tokens"]
    except ParamError as e:
        name = given.get(e.param, e.param)
        raise InvalidRequest(f"'{name}' {e.detail}", name) from None


def top_logprobs_of(body: dict) -> int | None:
    """Chat's `logprobs` (boolean) and `top_logprobs` (0-20, needs logprobs): None without logprobs,
    else the alternatives wanted per token."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequest(f"'logprobs' must be a boolean, got {logprobs!r}", "logprobs")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}",
                                 "top_logprobs")
        if not logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs' to be true", "top_logprobs")
    return (top or 0) if logprobs else None


def logprob_entry(state: AppState, token_id: int, logprob: float) -> dict:
    """One token in chat's logprobs shape (without its alternatives): the token's own text and
    UTF-8 bytes (`TokenPieces`)."""
    text, raw = state.streams.token_piece(token_id)
    return {"token": text, "logprob": finite_logprob(logprob), "bytes": raw}


def chat_logprobs(state: AppState, ev: TokenEvent) -> dict:
    """A generated token's entry of chat's `logprobs.content`, with its top_logprobs."""
    entry = logprob_entry(state, ev.id, ev.logprob)
    entry["top_logprobs"] = [logprob_entry(state, i, lp) for i, lp in ev.top or ()]
    return entry


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -inf (vLLM's stand-in)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the KV prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


Payload = Any  # a JSON-able object, or the literal string "[DONE]"


async def stream_sse(request: web.Request, state: AppState, events: AsyncIterator[tuple[int, TokenEvent]],
                     start: Callable[[], list[Payload]], on_event: Callable[[int, TokenEvent], list[Payload]],
                     end: Callable[[], list[Payload]]) -> web.StreamResponse:
    """Send `start()`, then `on_event(i, ev)` for every event, then `end()` and `[DONE]`.

    The response starts only once the first event is in, so an error before the first token
    still gets its proper status; a failure after that is sent in-band as an OpenAI error."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def send(payloads: list[Payload]) -> None:
        for p in payloads:
            data = p if isinstance(p, str) else json.dumps(p, ensure_ascii=False)
            await resp.write(f"data: {data}\n\n".encode())

    item = await anext(events)
    await resp.prepare(request)
    await send(start())
    while True:
        await send(on_event(*item))
        try:
            item = await anext(events)
        except StopAsyncIteration:
            await send(end())
            break
        except HTTPError as e:  # a worker failed mid-stream: tell the client in-band
            await send([openai_error(e.status, e.message)])
            break
    await send(["[DONE]"])
    state.streams.counters.outcome("ok")
    await resp.write_eof()
    return resp
