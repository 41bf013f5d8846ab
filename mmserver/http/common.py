"""What every route module shares: the per-server state, the JSON body reader, and the one
error middleware that renders errors in the shape of the API the path belongs to."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from ..frontend.errors import BadRequest, HTTPError, TooLarge
from ..frontend.intake import Intake
from ..frontend.streams import Streams
from .metrics import ServerMetrics

log = logging.getLogger("mmserver.http")

OPENAI_PREFIX = "/v1"


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
    max_n: int = 8  # most samples (`n`) one OpenAI request may ask for
    max_videos: int = 4
    api_key: str | None = None  # when set, every route but /health and /metrics needs it
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    health_details: Callable[[], dict] | None = None  # more /health fields (e.g. each remote encoder's state)


class Unauthorized(HTTPError):
    status = 401


def outcome_of(status: int) -> str:
    """The /metrics outcome label of a request that ended with an error `status`."""
    return "rejected" if status < 500 else ("overloaded" if status == 503 else "failed")


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def lightllm_error(status: int, message: str, param: str | None = None) -> dict:
    return {"message": message}


def error_response(path: str, status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> web.Response:
    render = openai_error if is_openai_path(path) else lightllm_error
    return web.json_response(render(status, message, param), status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The only error middleware: HTTPError (and, as a 500, any bug) becomes JSON in the
    OpenAI shape under /v1 and LightLLM's `{"message"}` elsewhere, counting the outcome; the
    server keeps serving either way. It also stamps the request's arrival (once)."""
    counters = request.config_dict["state"].streams.counters
    request["arrival"] = time.monotonic()  # TTFT breakdown: the body's upload and parse count as intake
    try:
        return await handler(request)
    except HTTPError as e:
        counters.outcome(outcome_of(e.status))
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error_response(request.path, e.status, e.message, getattr(e, "param", None), headers)
    except web.HTTPException:
        raise
    except Exception as e:  # a bug must not take the server down; the client gets a 500
        log.exception("internal error on %s", request.path)
        counters.outcome("failed")
        return error_response(request.path, 500, f"internal error: {type(e).__name__}: {e}")


async def json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except json.JSONDecodeError as e:
        raise BadRequest(f"invalid JSON body: {e}") from None
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8") from None
    except web.HTTPRequestEntityTooLarge as e:
        raise TooLarge(f"request body too large ({e.text})") from None
