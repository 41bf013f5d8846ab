"""API-key check (`--api_key` / MMSERVER_API_KEY): `Authorization: Bearer KEY` on every
route but the probes."""

from __future__ import annotations

import hmac

from aiohttp import web

from .common import Unauthorized

OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers carry no key


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Runs inside `error_middleware`, which renders the 401 in the path's API shape."""
    key: str | None = request.config_dict["state"].api_key
    if key is not None and request.path not in OPEN_PATHS:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        # constant time: the comparison must not tell how much of a guess was right
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise Unauthorized("invalid API key")
    return await handler(request)
