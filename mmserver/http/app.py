"""The aiohttp application: the route modules on one app, behind one error middleware
(aiohttp runs a parent app's middlewares on sub-app routes too, so there are no sub-apps)."""

from __future__ import annotations

from aiohttp import web

from . import completions, lightllm_api, openai_api
from .auth import auth_middleware
from .common import AppState, error_middleware


def build_app(state: AppState, max_request_bytes: int) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=max_request_bytes)
    app["state"] = state
    lightllm_api.add_routes(app.router)
    openai_api.add_routes(app.router)
    completions.add_routes(app.router)
    return app
