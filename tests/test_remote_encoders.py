"""Vision encoders on other hosts, on loopback: an LLM server with --visual_remote pointing at two
encoder-only servers (--run_mode visual_only) gives the single-process outputs token for token,
keeps its own embedding cache, and survives its encoders: a killed encoder fails only the
requests it held (503) and leaves the rotation; with both gone image requests get 503 and
text-only requests are served. Every server leaves no process and no segment behind.

The tests share three servers and run in order (the last ones kill the encoders)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import random_image
from mmserver import GenerationConfig, pipeline
from mmserver.visual.remote import pack, unpack
from server_util import alive, gen_body, shm_segments, start_server, stop_server

N = 4
KEY = "remote-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def pipe(ckpt):
    return pipeline(ckpt, device="cpu", dtype="float32")


def expect(pipe, prompt, images, n=N):
    return pipe.generate(prompt, images=images, gen_config=GenerationConfig(max_new_tokens=n, ignore_eos=True)).token_ids


@pytest.fixture(scope="module")
def servers(ckpt, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("remote-logs")
    encoders = []
    llm = None
    try:
        for _ in range(2):
            encoders.append(start_server(ckpt, "--run_mode", "visual_only", "--visual_infer_batch_size", "4",
                                         "--api_key", KEY, log_dir=log_dir))
        remote = ",".join(f"127.0.0.1:{e.port}" for e in encoders)
        llm = start_server(ckpt, "--visual_remote", remote, "--visual_remote_timeout", "20",
                           "--visual_infer_batch_size", "2", "--max_total_token_num", "16384", "--api_key", KEY,
                           log_dir=log_dir)
        yield llm, encoders
    finally:
        for s in ([llm] if llm else []) + encoders:
            if s.proc.poll() is None:
                stop_server(s)


def post(srv, body, timeout=120):
    return srv.post("/generate", body, timeout=timeout, headers=AUTH)


def details(prompt, images, n=N):
    return gen_body(prompt, images, max_new_tokens=n, ignore_eos=True, return_details=True)


def ids(body):
    return [t["id"] for t in body["tokens"]]


def test_outputs_equal_single_server(servers, pipe):
    llm, encoders = servers
    cases = [("<image>\nWhat is this?", [random_image(448, 448, 71)]),
             ("<image>\nDescribe.", [random_image(1000, 600, 72)]),  # several tiles
             ("Image-1: <image>\nImage-2: <image>\nCompare.", [random_image(300, 800, 73), random_image(640, 480, 74)]),
             ("Just text, please.", [])]
    for prompt, images in cases:
        status, body = post(llm, details(prompt, images))
        assert status == 200, body
        assert ids(body) == expect(pipe, prompt, images)
    # 16 concurrent requests with new images: spread over both encoders, same tokens
    work = [(f"<image>\nImage {i}.", [random_image(200 + 37 * i, 300, 100 + i)]) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda w: post(llm, details(*w)), work))
    for (status, body), (prompt, images) in zip(results, work):
        assert status == 200, body
        assert ids(body) == expect(pipe, prompt, images)
    encoded = [e.metrics().get("mmserver_vit_images_total", 0) for e in encoders]
    assert all(n > 0 for n in encoded) and sum(encoded) == 4 + 16, encoded


def test_repeated_image_is_a_cache_hit_on_the_llm_side(servers, pipe):
    llm, encoders = servers
    img = random_image(448, 448, 81)
    assert post(llm, details("<image>\nFirst.", [img]))[0] == 200
    before = [e.settled_metrics()["mmserver_vit_images_total"] for e in encoders]  # the first image counted
    m0 = llm.metrics()
    status, body = post(llm, details("<image>\nAgain.", [img]))
    assert status == 200 and ids(body) == expect(pipe, "<image>\nAgain.", [img])
    assert llm.metrics()["mmserver_embed_cache_hits_total"] == m0["mmserver_embed_cache_hits_total"] + 1
    assert [e.settled_metrics()["mmserver_vit_images_total"] for e in encoders] == before  # no encoder saw it


def test_a_video_is_encoded_remotely(servers, pipe):
    """A video's bytes and option key travel to an encoder, which samples and decodes it there."""
    import base64

    from mmserver import Video
    from video_util import make_clip

    llm, _ = servers
    clip = make_clip(n_frames=12, fps=6, seed=5)
    body = gen_body("<video>What happens?", max_new_tokens=N, ignore_eos=True, return_details=True)
    body["multimodal_params"] = {"videos": [{"type": "base64", "data": base64.b64encode(clip).decode(),
                                             "num_frames": 3}]}
    status, out = post(llm, body)
    assert status == 200, out
    assert ids(out) == expect(pipe, "<video>What happens?", [Video(clip, num_frames=3)])


def test_encoder_requires_the_api_key_and_checks_its_input(servers, ckpt):
    _, encoders = servers
    body = pack({"images": [{"options": "", "bytes": 3}]}, [b"abc"])
    assert encoders[0].post("/encode", body)[0] == 401
    assert encoders[0].post("/encode", body, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert encoders[0].post("/encode", b"\x00\x00\x00\x09garbage", headers=AUTH)[0] == 400
    import urllib.request
    req = urllib.request.Request(encoders[0].url + "/encode", data=body, headers=AUTH)
    with urllib.request.urlopen(req, timeout=30) as r:  # not an image: a per-image "invalid", not a failed call
        meta, _ = unpack(r.read())
    assert meta["images"][0]["status"] == "invalid"


def test_health_and_metrics_show_each_encoder(servers):
    llm, encoders = servers
    import json
    status, text = llm.get("/health")
    assert status == 200
    assert json.loads(text)["remote_encoders"] == {f"127.0.0.1:{e.port}": "up" for e in encoders}
    m = llm.metrics()
    for e in encoders:
        assert m[f'mmserver_remote_encoder_up{{address="127.0.0.1:{e.port}"}}'] == 1


def _wait_up(llm, enc, value, timeout=15):
    return llm.wait_metric(f'mmserver_remote_encoder_up{{address="127.0.0.1:{enc.port}"}}', value, timeout)


def _gone(srv, timeout=20):
    deadline = time.monotonic() + timeout
    while (any(alive(c) for c in srv.children) or shm_segments(srv.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not [c for c in srv.children if alive(c)] and shm_segments(srv.proc.pid) == []


def test_killed_encoder_fails_only_its_requests(servers, pipe):
    llm, (a, b) = servers
    os.kill(a.proc.pid, signal.SIGSTOP)  # stops answering: calls sent to it now wait
    work = [(f"<image>\nKill {i}.", [random_image(320, 200 + 29 * i, 200 + i)]) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, llm, details(*w), 60) for w in work]
        time.sleep(1.5)
        t0 = time.monotonic()
        os.kill(a.proc.pid, signal.SIGKILL)  # dies mid-run: its held calls fail at once
        results = [f.result() for f in futures]
        assert time.monotonic() - t0 < 10
    a.proc.wait(10)
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    for (status, body), (prompt, images) in zip(results, work):
        if status == 503:
            assert f"127.0.0.1:{a.port}" in body["message"], body
        else:
            assert ids(body) == expect(pipe, prompt, images)
    assert _wait_up(llm, a, 0) == 0 and _wait_up(llm, b, 1) == 1
    # the rest goes to the other encoder
    work = [(f"<image>\nAfter {i}.", [random_image(256, 256 + 13 * i, 300 + i)]) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda w: post(llm, details(*w)), work))
    for (status, body), (prompt, images) in zip(results, work):
        assert status == 200, body
        assert ids(body) == expect(pipe, prompt, images)
    assert _gone(a)  # a SIGKILLed encoder's children clean up after it


def test_all_encoders_down_fails_images_not_text(servers, pipe):
    llm, (a, b) = servers
    assert stop_server(b) == 0  # SIGTERM: a clean stop
    assert _gone(b)
    assert _wait_up(llm, b, 0) == 0
    t0 = time.monotonic()
    status, body = post(llm, details("<image>\nAnyone?", [random_image(400, 300, 400)]), timeout=30)
    assert status == 503 and time.monotonic() - t0 < 5, body
    status, body = post(llm, details("Text still works.", []))
    assert status == 200 and ids(body) == expect(pipe, "Text still works.", [])
    import json
    status, text = llm.get("/health")
    assert status == 200 and set(json.loads(text)["remote_encoders"].values()) == {"down"}
    assert stop_server(llm) == 0
    assert _gone(llm)
