"""Cache references taken by a request that is cancelled mid-call are given back."""

from __future__ import annotations

import asyncio
import threading
import time

from mmserver.frontend.intake import Intake, IntakeLimits
from mmserver.models.internvl.config import load_config


class SlowCache:
    """Stands in for the cache client: alloc takes a while, release is recorded."""

    def __init__(self):
        self.released: list[int] = []
        self.started = threading.Event()

    def alloc(self, items):
        self.started.set()
        time.sleep(0.3)
        return tuple((i + 1, f"emb-{i}", f"img-{i}", False) for i in range(len(items)))

    def release(self, ids):
        self.released.extend(ids)


def test_cancelled_alloc_releases_its_references(ckpt):
    cache = SlowCache()
    intake = Intake(load_config(ckpt), tokenizer=None, special=None, tokens_per_tile=256,
                    limits=IntakeLimits(1 << 20, 1.0, None, 4096, 5.0), cache=cache, session=None)

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
