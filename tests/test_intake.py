"""The intake: cache references taken by a request that is cancelled mid-call are given back; video headers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mmserver.frontend.intake import Intake, IntakeLimits
from mmserver.models.registry import load_family


class SlowCache:
    """Stands in for the cache client: alloc takes a while, release is recorded."""

    def __init__(self):
        self.released: list[int] = []
        self.started = threading.Event()

    def alloc_many(self, batches):
        self.started.set()
        time.sleep(0.3)
        return [tuple((i + 1, f"emb-{i}", f"img-{i}", False) for i in range(len(items))) for items in batches]

    def release(self, ids):
        self.released.extend(ids)


def test_cancelled_alloc_releases_its_references(ckpt):
    cache = SlowCache()
    intake = Intake(load_family(ckpt), limits=IntakeLimits(1 << 20, 1.0, None, 4096, 5.0), cache=cache, session=None)

    async def scenario():
        task = asyncio.create_task(intake._alloc([("a", 256, 10), ("b", 256, 10)]))
        while not cache.started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # the client went away while the cache call was in flight
        try:
            await task
        except asyncio.CancelledError:
            pass
        for _ in range(100):  # the release happens when the alloc call completes
            if cache.released:
                break
            await asyncio.sleep(0.02)

    asyncio.run(scenario())
    intake.close()
    assert sorted(cache.released) == [1, 2]


def test_image_encoded_meanwhile_needs_no_vit():
    """Two requests for one new image: the second's bytes write can come after the first's
    embedding was written and the image segment unlinked. That is a cache hit, not a 500."""
    import os

    from mmserver.embed_cache import shm
    from mmserver.frontend.images import LoadedImage
    from mmserver.frontend.intake import PreparedImage, _write_image_bytes
    from mmserver.ipc import ImageRef

    prefix = f"mmstest{os.getpid()}-"
    data = b"\x89PNG fake bytes"
    images = [PreparedImage(LoadedImage(data, "m", 1, 1), 1, 12)] * 2
    refs = [ImageRef(1, f"{prefix}emb-1", f"{prefix}img-gone", 256, len(data), True, 12),
            ImageRef(2, f"{prefix}emb-2", f"{prefix}img-2", 256, len(data), True, 12)]
    shm.create(refs[1].img_name, len(data)).close()
    try:
        _write_image_bytes(refs, images)
        seg = shm.attach(refs[1].img_name)
        try:
            assert bytes(seg.buf[:len(data)]) == data  # a live segment is written
        finally:
            seg.close()
    finally:
        shm.unlink(refs[1].img_name)
    assert refs[0].needs_vit is False and refs[1].needs_vit is True


def test_default_tile_cap_comes_from_max_patch_num(ckpt, monkeypatch):
    """MAX_PATCH_NUM is read (and checked) once, when the InternVL family is built, and sets the
    option key of images whose request gives no cap."""
    import pytest

    from mmserver.models.errors import ConfigError

    without = load_family(ckpt)
    monkeypatch.setenv("MAX_PATCH_NUM", "3")
    with_cap = load_family(ckpt)
    assert with_cap.default_cap == 3
    assert without.default_cap == without.config.max_dynamic_patch != 3
    limits = IntakeLimits(1 << 20, 1.0, None, 4096, 5.0)
    intake = Intake(with_cap, limits, None, None)
    try:
        assert intake.image_options([], {"image_max_patch_num": -1}) == []
        assert with_cap.image_options({"image_max_patch_num": -1}, {}) == "max3"
        assert with_cap.image_options({"image_max_patch_num": 5}, {}) == "max5"
    finally:
        intake.close()
    monkeypatch.setenv("MAX_PATCH_NUM", "0")
    with pytest.raises(ConfigError, match="MAX_PATCH_NUM=0 must be >= 1"):
        load_family(ckpt)


def _coalescer_scenario(call, n: int, on_orphan=None, cancel: int | None = None):
    """n concurrent callers of a Coalescer over `call` (run in one thread); caller `cancel`
    is cancelled while the first call is in flight. Returns (results or exceptions, coalescer)."""
    from concurrent.futures import ThreadPoolExecutor

    from mmserver.frontend.coalesce import Coalescer

    pool = ThreadPoolExecutor(1)
    c = Coalescer(pool, call, on_orphan=on_orphan)

    async def scenario():
        tasks = [asyncio.create_task(c(0))]
        await asyncio.sleep(0.05)  # the first call is in flight: the others queue behind it
        tasks += [asyncio.create_task(c(i)) for i in range(1, n)]
        await asyncio.sleep(0.01)
        if cancel is not None:
            tasks[cancel].cancel()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.3)  # let a call still running for a cancelled caller finish
        return out

    try:
        return asyncio.run(scenario()), c
    finally:
        pool.shutdown()


def test_coalescer_merges_queued_calls_and_routes_results():
    batches = []

    def call(args):
        batches.append(list(args))
        time.sleep(0.2)
        return [a * 10 for a in args]

    results, c = _coalescer_scenario(call, 6)
    assert results == [0, 10, 20, 30, 40, 50]
    assert batches == [[0], [1, 2, 3, 4, 5]] and c.calls == 2


def test_coalescer_gives_a_cancelled_callers_result_to_on_orphan():
    orphans = []
    results, _ = _coalescer_scenario(lambda args: (time.sleep(0.1), [a + 100 for a in args])[1], 4,
                                     on_orphan=orphans.append, cancel=2)
    assert isinstance(results[2], asyncio.CancelledError)
    assert results[:2] + results[3:] == [100, 101, 103]
    assert orphans == [102]  # the call still ran for it: what it took is handed back


def test_coalescer_raises_a_failed_call_in_every_caller():
    def call(args):
        time.sleep(0.05)
        raise ConnectionError("cache gone")

    results, _ = _coalescer_scenario(call, 3)
    assert all(isinstance(r, ConnectionError) for r in results)


def test_strict_base64():
    import binascii

    import pytest

    from mmserver.frontend.b64 import b64decode_strict

    assert b64decode_strict("aGVsbG8gd29ybGQ=") == b"hello world"
    for bad in ("aGVsbG8gd29ybGQ", "aGVs!G8=", "aGVs\nbG8=", "é"):
        with pytest.raises((binascii.Error, ValueError)):
            b64decode_strict(bad)


def test_video_header_over_the_pixel_limit_is_413(monkeypatch):
    """A video whose frames exceed PIL's decompression-bomb limit is refused from its header
    (413), and a bad one is a 400 naming it; neither decodes a frame."""
    from PIL import Image

    from mmserver.frontend import images as image_io
    from mmserver.frontend.errors import BadRequest, TooLarge
    from video_util import make_clip

    clip = make_clip(n_frames=4, fps=4)
    loaded = image_io.inspect_video(clip, 2)
    assert (loaded.width, loaded.height, loaded.meta.n_frames) == (64, 48, 4)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(TooLarge, match="video 2"):
        image_io.inspect_video(clip, 2)
    with pytest.raises(BadRequest, match="video 1"):
        image_io.inspect_video(b"\0" * 100, 1)
