"""RemoteEncoders against a fake encoder server, in-process: a call that outlives
--visual_remote_timeout fails only its images as "unavailable" and takes the encoder out of
rotation (the encoder process is still alive: nobody killed it); the /health probe puts it
back, and the next batch is encoded and written into this server's cache segments."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from aiohttp import web

from mmserver.embed_cache import shm
from mmserver.ipc import ImageRef
from mmserver.visual.remote import RemoteEncoders, pack, unpack

HIDDEN, ROWS = 8, 3


class FakeEncoder:
    def __init__(self):
        self.slow_s = 0.0  # how long /encode takes
        self.healthy = True
        self.calls = 0

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=200 if self.healthy else 503)

    async def encode(self, request: web.Request) -> web.Response:
        self.calls += 1
        meta, blob = unpack(await request.read())
        await asyncio.sleep(self.slow_s)
        rows = [torch.full((ROWS, HIDDEN), float(len(item["options"])), dtype=torch.float32) for item in meta["images"]]
        answer = {"dtype": "float32", "hidden": HIDDEN, "images": [{"status": "ok", "n_tokens": ROWS} for _ in rows]}
        return web.Response(body=pack(answer, [r.numpy().tobytes() for r in rows]))


@contextmanager
def fake_encoder():
    enc = FakeEncoder()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_get("/health", enc.health)
        app.router.add_post("/encode", enc.encode)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        port.append(runner.addresses[0][1])
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield enc, f"127.0.0.1:{port[0]}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


@pytest.fixture
def refs():
    """Two image records with their bytes and empty embedding segments, as the cache makes them."""
    prefix = f"mmstest{os.getpid()}-"
    made = []
    for i in (1, 2):
        img, emb = f"{prefix}img-{i}", f"{prefix}emb-{i}"
        seg = shm.create(img, 16)
        seg.buf[:16] = bytes(range(16))
        seg.close()
        shm.create(emb, ROWS * HIDDEN * 4).close()
        made.append(ImageRef(i, emb, img, ROWS, 16, True, "max12"))
    yield made
    shm.sweep(prefix)


def wait_result(group: RemoteEncoders, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = group.poll()
        if result is not None:
            return result
        time.sleep(0.01)
    raise AssertionError("no batch result")


def wait_state(group: RemoteEncoders, address: str, value: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while group.states()[address] != value and time.monotonic() < deadline:
        time.sleep(0.02)
    return group.states()[address]


def test_timeout_leaves_rotation_and_the_probe_brings_it_back(refs):
    with fake_encoder() as (enc, address):
        group = RemoteEncoders([address], HIDDEN, torch.float32, timeout_s=0.5, probe_interval_s=0.2)
        try:
            assert group.states() == {address: 1}
            enc.slow_s, enc.healthy = 2.0, False  # hangs on /encode and says so on /health
            group.dispatch(refs[:1])
            result = wait_result(group)
            assert result.done == [] and len(result.failed) == 1
            record, kind, message = result.failed[0]
            assert (record, kind) == (1, "unavailable") and "no answer within 0.5s" in message
            assert group.states() == {address: 0}
            group.dispatch(refs[1:])  # nothing up: fails at once, without a call
            again = wait_result(group)
            assert again.failed[0][:2] == (2, "unavailable") and "no remote vision encoder" in again.failed[0][2]
            assert enc.calls == 1
            enc.slow_s, enc.healthy = 0.0, True
            assert wait_state(group, address, 1) == 1  # the probe found it healthy again
            group.dispatch(refs[1:])
            done = wait_result(group)
            assert done.done == [2] and done.failed == []
            seg = shm.attach(refs[1].emb_name)
            try:
                rows = shm.tensor_view(seg, (ROWS, HIDDEN), torch.float32).clone()
            finally:
                seg.close()
            assert torch.equal(rows, torch.full((ROWS, HIDDEN), float(len("max12"))))
        finally:
            group.close()
