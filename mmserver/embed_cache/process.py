"""Entry of the embed-cache process: an rpyc server over a Unix socket."""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

from . import shm
from .cache import EmbedCache
from .service import serve


def run_cache(ready: Callable, prefix: str, socket_path: str, hidden_size: int, itemsize: int, capacity: int,
              max_bytes: int) -> None:
    cache = EmbedCache(prefix, hidden_size, itemsize, capacity, max_bytes)

    def stop(*_) -> None:
        # Runs on SIGTERM, also when the HTTP process died without cleaning up (PR_SET_PDEATHSIG):
        # every segment of this server goes, not only the cache's own.
        shm.sweep(prefix)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    server = serve(cache, socket_path)
    thread = threading.Thread(target=server.start, name="rpyc", daemon=True)
    thread.start()
    while not server.active:  # listening before we say ready
        thread.join(0.01)
    ready()
    while thread.is_alive():
        thread.join(0.5)  # wake up regularly so a pending SIGTERM handler gets to run
    stop()
