"""Entry of the embed-cache process: an rpyc server over a Unix socket."""

from __future__ import annotations

import threading
from typing import Callable

from . import shm
from .cache import EmbedCache
from .service import serve


def run_cache(ready: Callable, prefix: str, socket_path: str, hidden_size: int, itemsize: int, capacity: int,
              max_bytes: int) -> None:
    cache = EmbedCache(prefix, hidden_size, itemsize, capacity, max_bytes)
    server = serve(cache, socket_path)
    thread = threading.Thread(target=server.start, name="rpyc", daemon=True)
    thread.start()
    while not server.active:  # listening before we say ready
        thread.join(0.01)
    ready()
    try:
        thread.join()
    finally:
        cache.close()
        shm.sweep(prefix)  # the server's other segments too, if the HTTP process died first
