"""The aiohttp application: the route modules on one app, behind one error middleware
(aiohttp runs a parent app's middlewares on sub-app routes too, so there are no sub-apps)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

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


HEALTH_POLL_S = 0.25


async def serve_until_signal(dead: Callable[[], str | None], failed: Callable[[], bool],
                             fail_all: Callable[[str], None], log: logging.Logger) -> None:
    """Return on SIGINT / SIGTERM; meanwhile, when a worker dies (`dead()` names why), fail
    every request in flight once (`failed()`: already done). On the way out, whatever is
    still in flight fails with "server shutting down"; the caller then tears down."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def watch_children() -> None:
        while not stop.is_set():
            reason = dead()
            if reason and not failed():
                log.error("worker failure: %s", reason)
                fail_all(reason)
            await asyncio.sleep(HEALTH_POLL_S)

    watcher = asyncio.create_task(watch_children())
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        fail_all("server shutting down")
