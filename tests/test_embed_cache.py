"""EmbedCache in-process: all-or-nothing allocs, LRU among unreferenced records only,
never-embedded records dropped with their last reference, references dropped once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmserver.embed_cache.cache import CacheFull, EmbedCache

HIDDEN, ITEMSIZE = 4, 4  # one token's embedding is 16 bytes


@pytest.fixture
def cache():
    c = EmbedCache(f"mmstest{os.getpid()}-cache-", HIDDEN, ITEMSIZE, capacity=2, max_bytes=1 << 20)
    yield c
    c.close()
    assert not list(Path("/dev/shm").glob(f"{c.prefix}*")), "close() leaves no segment"


def _segments(c: EmbedCache) -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"{c.prefix}*")}


def _alloc(c: EmbedCache, *keys: str, n_tokens: int = 2, img_bytes: int = 8) -> list[int]:
    return [rid for rid, *_ in c.alloc(tuple((k, n_tokens, img_bytes) for k in keys))]


def _stats(c: EmbedCache) -> dict[str, int]:
    return dict(c.stats())


def test_alloc_is_all_or_nothing(cache):
    (held,) = _alloc(cache, "held")
    with pytest.raises(CacheFull):
        _alloc(cache, "new-1", "new-2")  # new-1 fits, new-2 does not: neither is kept
    assert _stats(cache)["records"] == 1 and _stats(cache)["in_use"] == 1
    assert _segments(cache) == {f"{cache.prefix}emb-{held}", f"{cache.prefix}img-{held}"}


def test_a_hit_takes_a_reference_on_the_same_record(cache):
    (a,) = _alloc(cache, "a")
    cache.mark_embedding((a,))
    assert cache.alloc((("a", 2, 8),)) == ((a, f"{cache.prefix}emb-{a}", f"{cache.prefix}img-{a}", True),)
    assert _stats(cache)["hits"] == 1 and _stats(cache)["misses"] == 1


def test_eviction_is_lru_among_unreferenced_records(cache):
    a, b = _alloc(cache, "a"), _alloc(cache, "b")
    cache.mark_embedding((*a, *b))
    with pytest.raises(CacheFull, match="in use"):
        _alloc(cache, "c")  # both records are referenced: nothing may go
    cache.release(tuple(b))
    cache.release(tuple(a))  # b is now the older unreferenced record
    _alloc(cache, "c")
    assert _stats(cache)["evictions"] == 1
    assert [rid for rid, *_ in cache.alloc((("a", 2, 8),))] == a  # a survived, b was evicted
    with pytest.raises(CacheFull):
        _alloc(cache, "d")  # a and c are both referenced again


def test_a_referenced_record_moves_out_of_the_lru(cache):
    a, b = _alloc(cache, "a"), _alloc(cache, "b")
    cache.mark_embedding((*a, *b))
    cache.release(tuple(a))
    cache.release(tuple(b))
    assert _alloc(cache, "a") == a  # a hit: a is in use again, so b is the only candidate
    _alloc(cache, "c")
    assert _alloc(cache, "a") == a and _stats(cache)["evictions"] == 1


def test_record_never_embedded_is_dropped_with_its_last_reference(cache):
    a = _alloc(cache, "a")
    _alloc(cache, "a")  # a second request waits for the same image
    cache.release(tuple(a))
    assert _stats(cache)["records"] == 1  # still referenced
    cache.release(tuple(a))
    assert _stats(cache)["records"] == 0 and _stats(cache)["bytes"] == 0 and not _segments(cache)


def test_embedding_unlinks_the_image_bytes(cache):
    (a,) = _alloc(cache, "a", n_tokens=3, img_bytes=100)
    assert _stats(cache)["bytes"] == 3 * HIDDEN * ITEMSIZE + 100
    cache.mark_embedding((a,))
    assert _stats(cache)["bytes"] == 3 * HIDDEN * ITEMSIZE
    assert _segments(cache) == {f"{cache.prefix}emb-{a}"}


def test_release_counts_each_reference_once(cache):
    a = _alloc(cache, "a")
    _alloc(cache, "a")
    cache.mark_embedding(tuple(a))
    cache.release(tuple(a))
    cache.release(tuple(a))
    cache.release(tuple(a))  # one too many: ignored, the count does not go below zero
    assert _stats(cache)["in_use"] == 0 and _stats(cache)["records"] == 1
    assert _alloc(cache, "a") == a  # a later reference still pins it: one reference, not zero
    assert _stats(cache)["in_use"] == 1
    cache.release(tuple(a))
    assert _stats(cache)["in_use"] == 0
    cache.release((a[0] + 100,))  # an unknown (already dropped) id is a no-op


def test_one_image_larger_than_the_cache_is_refused(cache):
    cache.max_bytes = 64
    with pytest.raises(CacheFull, match="more than the cache"):
        _alloc(cache, "huge", n_tokens=10)
