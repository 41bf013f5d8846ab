"""The image-embedding cache: refcounted records, LRU among unreferenced ones (DESIGN §5).

A record is one image under one set of preprocessing parameters (the key). Its embedding
lives in a shared-memory segment that the ViT worker fills and the model worker reads;
the image file bytes travel in a second segment until the embedding exists.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass

from . import shm


class CacheFull(RuntimeError):
    """Every record is in use and the new ones do not fit; the caller retries or gives up (503)."""


@dataclass
class Record:
    id: int
    key: str
    n_tokens: int
    emb_bytes: int
    img_bytes: int
    emb_name: str
    img_name: str
    refcount: int = 0
    has_embedding: bool = False


class EmbedCache:
    def __init__(self, prefix: str, hidden_size: int, itemsize: int, capacity: int, max_bytes: int):
        self.prefix = prefix
        self.hidden_size = hidden_size
        self.itemsize = itemsize
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._by_key: dict[str, Record] = {}
        self._by_id: dict[int, Record] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced records, oldest first
        self._ids = itertools.count(1)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    # ----------------------------------------------------------------------------------

    def alloc(self, items: tuple[tuple[str, int, int], ...]) -> tuple[tuple[int, str, str, bool], ...]:
        """Take a reference on each (key, n_tokens, image_bytes); all or nothing.

        Returns (record id, embedding segment, image segment, embedding present) per item.
        """
        with self._lock:
            taken: list[Record] = []
            try:
                for key, n_tokens, img_bytes in items:
                    rec = self._by_key.get(key)
                    if rec is None:
                        rec = self._create(key, int(n_tokens), int(img_bytes))
                        self.misses += 1
                    else:
                        self.hits += 1
                    self._ref(rec)
                    taken.append(rec)
            except CacheFull:
                for rec in taken:
                    self._unref(rec)
                raise
            return tuple((r.id, r.emb_name, r.img_name, r.has_embedding) for r in taken)

    def release(self, ids: tuple[int, ...]) -> None:
        with self._lock:
            for i in ids:
                rec = self._by_id.get(i)
                if rec is not None:
                    self._unref(rec)

    def mark_embedding(self, ids: tuple[int, ...]) -> None:
        """The ViT filled these; the image bytes are no longer needed."""
        with self._lock:
            for i in ids:
                rec = self._by_id.get(i)
                if rec is None:
                    continue
                rec.has_embedding = True
                if rec.img_bytes:
                    shm.unlink(rec.img_name)
                    self.bytes -= rec.img_bytes
                    rec.img_bytes = 0

    def stats(self) -> tuple[tuple[str, int], ...]:
        with self._lock:
            in_use = sum(1 for r in self._by_id.values() if r.refcount > 0)
            return (("hits", self.hits), ("misses", self.misses), ("evictions", self.evictions),
                    ("bytes", self.bytes), ("records", len(self._by_id)), ("in_use", in_use),
                    ("capacity", self.capacity))

    def close(self) -> None:
        with self._lock:
            for rec in list(self._by_id.values()):
                self._drop(rec)

    # ----------------------------------------------------------------------------------

    def _create(self, key: str, n_tokens: int, img_bytes: int) -> Record:
        emb_bytes = n_tokens * self.hidden_size * self.itemsize
        need = emb_bytes + img_bytes
        if need > self.max_bytes:
            raise CacheFull(f"one image needs {need} bytes, more than the cache's {self.max_bytes}")
        while len(self._by_id) >= self.capacity or self.bytes + need > self.max_bytes:
            if not self._lru:
                raise CacheFull("embedding cache is full of images in use")
            self._drop(self._by_id[next(iter(self._lru))])
            self.evictions += 1
        rid = next(self._ids)
        rec = Record(rid, key, n_tokens, emb_bytes, img_bytes, f"{self.prefix}emb-{rid}", f"{self.prefix}img-{rid}")
        # Segments are created here so one process owns their lifetime.
        shm.create(rec.emb_name, emb_bytes).close()
        if img_bytes:
            shm.create(rec.img_name, img_bytes).close()
        self.bytes += need
        self._by_key[key] = rec
        self._by_id[rid] = rec
        return rec

    def _ref(self, rec: Record) -> None:
        rec.refcount += 1
        self._lru.pop(rec.id, None)

    def _unref(self, rec: Record) -> None:
        if rec.refcount <= 0:
            return
        rec.refcount -= 1
        if rec.refcount == 0:
            if rec.has_embedding:
                self._lru[rec.id] = None  # newest at the end
            else:
                self._drop(rec)  # never computed and nobody waits for it

    def _drop(self, rec: Record) -> None:
        shm.unlink(rec.emb_name)
        if rec.img_bytes:
            shm.unlink(rec.img_name)
        self.bytes -= rec.emb_bytes + rec.img_bytes
        self._lru.pop(rec.id, None)
        self._by_key.pop(rec.key, None)
        self._by_id.pop(rec.id, None)
