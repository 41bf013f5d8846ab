"""The cache as an rpyc service in its own process, and the client other processes use.

Records (small) go over rpyc; embeddings and image bytes never do: they live in the
shared-memory segments the records name.
"""

from __future__ import annotations

import logging
import threading

import rpyc
from rpyc.utils.server import ThreadedServer

from .cache import CacheFull, EmbedCache

_RPYC_CONFIG = {"allow_public_attrs": False, "sync_request_timeout": 30}


class CacheService(rpyc.Service):
    def __init__(self, cache: EmbedCache):
        super().__init__()
        self.cache = cache

    def exposed_alloc_many(self, batches):
        """`alloc` of several requests' items in one round trip; each request all or nothing."""
        return tuple(self._alloc(items) for items in batches)

    def _alloc(self, items):
        try:
            return ("ok", self.cache.alloc(tuple((str(k), int(n), int(b)) for k, n, b in items)))
        except CacheFull as e:
            return ("full", str(e))

    def exposed_release(self, ids):
        self.cache.release(tuple(int(i) for i in ids))

    def exposed_mark_embedding(self, ids):
        self.cache.mark_embedding(tuple(int(i) for i in ids))

    def exposed_stats(self):
        return self.cache.stats()


def serve(cache: EmbedCache, socket_path: str) -> ThreadedServer:
    quiet = logging.getLogger("mmserver.embed_cache.rpyc")
    quiet.setLevel(logging.WARNING)  # rpyc logs every connect/disconnect at INFO
    return ThreadedServer(CacheService(cache), socket_path=socket_path, protocol_config=_RPYC_CONFIG, logger=quiet)


class CacheClient:
    """Thread-safe client: one rpyc connection guarded by a lock."""

    def __init__(self, socket_path: str):
        self._conn = rpyc.utils.factory.unix_connect(socket_path, config=_RPYC_CONFIG)
        self._lock = threading.Lock()

    def alloc_many(self, batches: list[list[tuple[str, int, int]]]) -> list[tuple[tuple[int, str, str, bool], ...] | None]:
        """Take a reference on each request's (key, n_tokens, image_bytes) items, all or nothing per
        request, for several requests in one round trip. Per request: (record id, embedding
        segment, image segment, embedding present) per item, or None when the cache is full of
        records in use."""
        with self._lock:
            out = self._conn.root.alloc_many(tuple(tuple(tuple(i) for i in items) for items in batches))
            return [tuple(tuple(v) for v in value) if status == "ok" else None for status, value in out]

    def release(self, ids: list[int]) -> None:
        if ids:
            with self._lock:
                self._conn.root.release(tuple(ids))

    def mark_embedding(self, ids: list[int]) -> None:
        with self._lock:
            self._conn.root.mark_embedding(tuple(ids))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {k: int(v) for k, v in self._conn.root.stats()}

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:
            pass
