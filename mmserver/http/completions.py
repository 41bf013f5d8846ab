"""POST /v1/completions: OpenAI's (legacy) text completions, text only.

`prompt` is a string, a list of strings, a list of token ids or a list of token-id lists;
each prompt gets `n` choices, choice index = prompt_index * n + sample_index (as OpenAI and
vLLM number them). The prompt is tokenized as is (the tokenizer's special tokens, e.g. BOS,
added; no chat template). Choices over the OpenAI defaults of this server:
- `max_tokens` defaults to 16 (OpenAI's default for this route);
- greedy unless `temperature` > 0 is given, as in chat;
- `logprobs` (an integer k): per token, the chosen token's log-probability under the model's
  raw distribution, and in `top_logprobs` the k most likely tokens, plus the chosen one when it
  is not among them (OpenAI's rule: up to k + 1 entries);
- structured outputs as in chat (`response_format`, `structured_outputs`, `guided_*`);
- `echo` with `logprobs` needs prompt log-probabilities, not available yet: a 400.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from ..frontend.streams import TokenEvent
from .common import AppState, json_body
from .openai_common import (GUIDED, PARAM_NAMES, InvalidRequest, check_fields, check_model, finish_reason, finite_logprob,
                            parse_n, sampling, stream_options, stream_sse, usage)
from .requests import Submission, admit, merged, prepare, release
from .schemas import GenerateRequest

DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 20
_FIELDS = {"model", "prompt", "stream", "stream_options", "n", "best_of", "echo", "logprobs", *PARAM_NAMES, *GUIDED}
_IGNORED = {"user"}  # does not change what is generated


@dataclass
class Prompt:
    text: str  # what `echo` prepends
    ids: list[int]


@dataclass
class CompletionRequest:
    prompts: list[Prompt]
    request: GenerateRequest  # parameters shared by every prompt
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None


# ---------------------------------------------------------------------------------------
# Request parsing


def parse_completion(body: Any, state: AppState) -> CompletionRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    check_fields(body, _FIELDS, _IGNORED)
    check_model(body)
    stream, include_usage = stream_options(body)
    n = parse_n(body, state.max_n)
    best_of = body.get("best_of")
    if best_of is not None and (not isinstance(best_of, int) or isinstance(best_of, bool) or best_of != n):
        raise InvalidRequest(f"'best_of' other than n is not supported (got {best_of!r}, n = {n})", "best_of")
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise InvalidRequest(f"'echo' must be a boolean, got {echo!r}", "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise InvalidRequest(f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}", "logprobs")
    if echo and logprobs is not None:
        raise InvalidRequest("'logprobs' with 'echo' needs prompt log-probabilities, which are not supported yet",
                             "logprobs")
    params, skip_special = sampling(body, PARAM_NAMES, state.stop_token_ids, DEFAULT_MAX_TOKENS)
    params.top_logprobs = logprobs or 0
    prompts = [_prompt(p, i, state, skip_special) for i, p in enumerate(_prompt_list(body.get("prompt")))]
    req = GenerateRequest(inputs="", params=params, skip_special_tokens=skip_special)
    return CompletionRequest(prompts, req, n, stream, include_usage, echo, logprobs)


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _prompt_list(raw: Any) -> list[str | list[int]]:
    if raw is None:
        raise InvalidRequest("'prompt' is required", "prompt")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(p, str) for p in raw):
            return list(raw)
        if all(_is_token(t) for t in raw):
            return [raw]
        if all(isinstance(p, list) and all(_is_token(t) for t in p) for p in raw):
            return list(raw)
    raise InvalidRequest("'prompt' must be a string, a non-empty list of strings, a list of token ids or a list "
                         "of token-id lists", "prompt")


def _prompt(raw: str | list[int], index: int, state: AppState, skip_special: bool) -> Prompt:
    """Token ids checked against the vocabulary; image tokens are refused (they would stand
    for image rows this route never takes)."""
    where = f"prompt[{index}]"
    family = state.intake.family
    tokenizer = family.tokenizer
    if isinstance(raw, str):
        ids = tokenizer(raw, add_special_tokens=True)["input_ids"]
        if family.find_spans(ids):
            raise InvalidRequest(f"{where} contains the model's reserved image token; /v1/completions takes text "
                                 f"only (send images to /v1/chat/completions)", "prompt")
        text = raw
    else:
        vocab = family.config.llm.vocab_size
        for j, t in enumerate(raw):
            if not 0 <= t < vocab:
                raise InvalidRequest(f"{where}[{j}]: token id {t} is outside the vocabulary [0, {vocab})", "prompt")
        if spans := family.find_spans(raw):
            raise InvalidRequest(f"{where}[{spans[0][0]}]: token id {raw[spans[0][0]]} is the model's image token; "
                                 f"/v1/completions takes text only", "prompt")
        ids = list(raw)
        text = tokenizer.decode(ids, skip_special_tokens=skip_special)
    if not ids:
        raise InvalidRequest(f"{where} is empty (0 tokens)", "prompt")
    return Prompt(text, ids)


async def _prepare_all(state: AppState, req: CompletionRequest, arrival: float | None) -> list[Submission]:
    """n submissions per prompt, in choice order; all or nothing."""
    admit(state, len(req.prompts) * req.n)
    subs: list[Submission] = []
    try:
        for p in req.prompts:
            one = replace(req.request, input_ids=p.ids, params=replace(req.request.params))
            subs += await prepare(state, one, n=req.n, arrival=arrival, admitted=True)
    except BaseException:
        await release(state, subs)
        raise
    return subs


# ---------------------------------------------------------------------------------------
# Responses


@dataclass
class _Logprobs:
    """OpenAI's completions `logprobs` object for one choice, built token by token."""

    offset: int  # where the next token's text starts in the choice's text
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, token: str, ev: TokenEvent, text_of) -> None:
        lp = finite_logprob(ev.logprob)
        self.tokens.append(token)
        self.token_logprobs.append(lp)
        top = {text_of(i): finite_logprob(x) for i, x in ev.top or ()}
        top.setdefault(token, lp)  # the chosen token is always there
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(ev.text)

    def take(self) -> dict:
        """The object so far, and start a new one (a streamed chunk carries its own tokens)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


class _Choices:
    """Per-choice text, counts and logprobs as the events arrive."""

    def __init__(self, state: AppState, req: CompletionRequest):
        self.state = state
        self.req = req
        n_choices = len(req.prompts) * req.n
        self.echo = [self.prompt(i).text if req.echo else "" for i in range(n_choices)]
        self.last: dict[int, TokenEvent] = {}
        self.logprobs = [_Logprobs(len(e)) if req.logprobs is not None else None for e in self.echo]
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def prompt(self, index: int) -> Prompt:
        return self.req.prompts[index // self.req.n]

    def add(self, i: int, ev: TokenEvent) -> None:
        self.last[i] = ev
        if self.logprobs[i] is not None:
            text_of = self.state.streams.token_text
            self.logprobs[i].add(text_of(ev.id), ev, text_of)

    def usage(self) -> dict:
        prompt_tokens = sum(len(p.ids) for p in self.req.prompts)  # each prompt once, whatever n
        cached: dict[int, int] = {}  # per prompt: the most any of its samples reused
        for i, ev in self.last.items():
            cached[i // self.req.n] = max(cached.get(i // self.req.n, 0), ev.prompt_cache_len)
        return usage(prompt_tokens, sum(ev.count for ev in self.last.values()), sum(cached.values()))

    def envelope(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.state.model_name, "choices": choices, **extra}


async def completions(request: web.Request) -> web.StreamResponse:
    state: AppState = request.config_dict["state"]
    req = parse_completion(await json_body(request), state)
    subs = await _prepare_all(state, req, request.get("arrival"))
    choices = _Choices(state, req)
    async with contextlib.aclosing(merged(state, subs)) as events:  # started at once: references released
        if req.stream:
            return await _stream(request, state, events, choices)
        async for i, ev in events:
            choices.add(i, ev)
    state.streams.counters.outcome("ok")
    body = [{"index": i, "text": choices.echo[i] + ev.full_text,
             "logprobs": choices.logprobs[i].take() if choices.logprobs[i] is not None else None,
             "finish_reason": finish_reason(ev.finish_reason)} for i, ev in sorted(choices.last.items())]
    return web.json_response(choices.envelope(body, usage=choices.usage()))


async def _stream(request: web.Request, state: AppState, events, choices: _Choices) -> web.StreamResponse:
    include_usage = choices.req.include_usage

    def chunk(i: int, text: str, reason: str | None = None) -> dict:
        lp = choices.logprobs[i].take() if choices.logprobs[i] is not None else None
        extra = {"usage": None} if include_usage else {}
        return choices.envelope([{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}], **extra)

    def start() -> list[dict]:
        return [chunk(i, e) for i, e in enumerate(choices.echo) if e]

    def on_event(i: int, ev: TokenEvent) -> list[dict]:
        choices.add(i, ev)
        if ev.finished:
            return [chunk(i, ev.text, finish_reason(ev.finish_reason))]
        # a token whose text is still held back (partial character, possible stop string)
        # rides with the next chunk, logprobs included
        return [chunk(i, ev.text)] if ev.text else []

    def end() -> list[dict]:
        return [choices.envelope([], usage=choices.usage())] if include_usage else []

    return await stream_sse(request, state, events, start, on_event, end)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/completions", completions)
