"""End to end: the real multiprocess server on CPU, real HTTP, compared with the pipeline."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mmserver import GenerationConfig
from server_util import (alive, gen_body, hang_up, image_b64, serve_directory, shm_segments, start_server,
                         stop_server)

N = 6
CPU_FLAGS = ["--enable_multimodal", "--max_total_token_num", "40000", "--max_req_total_len", "8192",
             "--running_max_req_size", "48", "--max_images_per_request", "3", "--max_image_bytes", "3000000",
             "--image_fetch_timeout", "1", "--visual_infer_batch_size", "4",
             "--overlap_schedule", "on",  # the GPU default, so these tests cover it
             "--allow_private_media_urls"]  # the image URLs below are served from loopback


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory, media_dir):
    srv = start_server(ckpt, *CPU_FLAGS, "--allowed_local_media_path", str(media_dir),
                       log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop_server(srv)


def expected(pipe, prompt, images=(), n=N, **kw):
    return pipe.generate(prompt, images=list(images),
                         gen_config=GenerationConfig(max_new_tokens=n, ignore_eos=True, **kw)).token_ids


def ids_of(body: dict) -> list[int]:
    return [t["id"] for t in body["tokens"]]


@pytest.fixture(scope="module")
def cases(image_factory_m):
    f = image_factory_m
    return {
        "text": ("<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n", []),
        "one_image": ("<image>\nWhat is in the picture?", [f(448, 448, 21)]),
        "multi_tile": ("<image>\nDescribe it.", [f(1280, 720, 22)]),
        "multi_image": ("Image-1: <image>\nImage-2: <image>\nCompare.", [f(300, 900, 23), f(500, 400, 24)]),
    }


@pytest.fixture(scope="module")
def image_factory_m():
    from conftest import random_image

    return random_image


@pytest.mark.parametrize("case", ["text", "one_image", "multi_tile", "multi_image"])
def test_generate_equals_pipeline(server, pipe, cases, case):
    prompt, images = cases[case]
    status, body = server.post("/generate", gen_body(prompt, images, max_new_tokens=N, ignore_eos=True,
                                                     return_details=True))
    assert status == 200, body
    assert ids_of(body) == expected(pipe, prompt, images)
    assert body["count_output_tokens"] == N and body["finish_reason"] == "length"
    assert body["prompt_tokens"] == len(pipe.prepare(prompt, images)[0])
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in body["tokens"])


def test_stream_equals_generate(server, pipe, cases):
    prompt, images = cases["one_image"]
    status, events = server.stream(gen_body(prompt, images, max_new_tokens=N, ignore_eos=True))
    assert status == 200
    assert [e["token"]["id"] for e in events] == expected(pipe, prompt, images)
    assert [e["finished"] for e in events] == [False] * (N - 1) + [True]
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert [e["token"]["count_output_tokens"] for e in events] == list(range(1, N + 1))


def test_32_concurrent_mixed_requests(server, pipe, cases):
    bodies, wants = [], []
    names = list(cases)
    for i in range(32):
        prompt, images = cases[names[i % len(names)]]
        n = 3 + i % 5
        bodies.append(gen_body(prompt, images, max_new_tokens=n, ignore_eos=True, return_details=True))
        wants.append((prompt, images, n))
    refs = {}
    for prompt, images, n in wants:
        key = (prompt, n)
        if key not in refs:
            refs[key] = expected(pipe, prompt, images, n)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda b: server.post("/generate", b), bodies))
    for (status, body), (prompt, _, n) in zip(results, wants):
        assert status == 200, body
        assert ids_of(body) == refs[(prompt, n)]
    assert server.wait_metric("mmserver_kv_slots_used", 0) == 0


def test_repeated_image_is_a_cache_hit(server, pipe, image_factory_m):
    img = image_factory_m(640, 480, 31)
    prompt = "<image>\nAgain?"
    before = server.metrics()
    first = server.post("/generate", gen_body(prompt, [img], max_new_tokens=N, ignore_eos=True,
                                              return_details=True))[1]
    mid = server.metrics()
    second = server.post("/generate", gen_body(prompt, [img], max_new_tokens=N, ignore_eos=True,
                                               return_details=True))[1]
    after = server.metrics()
    assert mid["mmserver_embed_cache_misses_total"] == before["mmserver_embed_cache_misses_total"] + 1
    assert after["mmserver_embed_cache_hits_total"] == mid["mmserver_embed_cache_hits_total"] + 1
    server.wait_metric("mmserver_vit_images_total", mid["mmserver_vit_images_total"])
    assert server.metrics()["mmserver_vit_images_total"] == mid["mmserver_vit_images_total"]  # ViT skipped
    assert ids_of(first) == ids_of(second) == expected(pipe, prompt, [img])


def test_prompt_cache_len_and_cached_tokens_grow_on_the_second_turn(server, pipe, image_factory_m):
    """The KV prefix cache over HTTP: a second turn re-sending the first turn's prompt reuses
    its KV (LightLLM's prompt_cache_len, OpenAI's cached_tokens, /metrics), same tokens as the pipeline."""
    img = image_factory_m(448, 448, 41)
    turn1 = "<|im_start|>user\n<image>\nWhat colour is it, friend?<|im_end|>\n<|im_start|>assistant\n"
    turn2 = turn1 + "Blue.<|im_end|>\n<|im_start|>user\nAre you sure?<|im_end|>\n<|im_start|>assistant\n"
    before = server.settled_metrics()
    status, first = server.post("/generate", gen_body(turn1, [img], max_new_tokens=N, ignore_eos=True,
                                                      return_details=True))
    assert status == 200, first
    assert first["prompt_cache_len"] < first["prompt_tokens"] // 2  # at most a template prefix of earlier tests
    status, events = server.stream(gen_body(turn2, [img], max_new_tokens=N, ignore_eos=True))
    assert status == 200
    assert "prompt_cache_len" not in events[0] and events[-1]["finished"]
    assert first["prompt_tokens"] - 1 <= events[-1]["prompt_cache_len"] < events[-1]["token"]["prompt_tokens"]
    assert [e["token"]["id"] for e in events] == expected(pipe, turn2, [img])
    assert ids_of(first) == expected(pipe, turn1, [img])
    after = server.settled_metrics()  # router stats arrive every 0.2 s
    assert (after["mmserver_prompt_cache_hit_tokens_total"] - before["mmserver_prompt_cache_hit_tokens_total"]
            >= events[-1]["prompt_cache_len"])
    assert after["mmserver_prompt_cache_tokens"] > 0
    # OpenAI: the same conversation as messages
    url = "data:image/png;base64," + image_b64(img)
    user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": "Which shape do you see here?"}]}
    chat = [{"role": "user", "content": "Hi there, assistant."}, {"role": "assistant", "content": "Hello."}, user]
    r1 = server.post("/v1/chat/completions", {"model": "m", "messages": chat, "max_tokens": 3})[1]
    r2 = server.post("/v1/chat/completions", {"model": "m", "max_tokens": 3, "messages": chat + [
        {"role": "assistant", "content": "A square."}, {"role": "user", "content": "And its colour?"}]})[1]
    u1, u2 = r1["usage"], r2["usage"]
    assert u1["prompt_tokens_details"]["cached_tokens"] < u1["prompt_tokens"] // 2
    assert u1["prompt_tokens"] - 1 <= u2["prompt_tokens_details"]["cached_tokens"] < u2["prompt_tokens"]


@pytest.fixture(scope="module")
def image_url_base(media_dir):
    with serve_directory(media_dir) as url:
        yield url


def test_url_and_file_images_equal_base64(server, pipe, media_dir, image_url_base, image_factory_m):
    img = image_factory_m(700, 500, 71)
    img.save(media_dir / "photo.png")
    prompt = "<image>\nWhere was this taken?"
    want = expected(pipe, prompt, [img])
    for item in ({"type": "url", "data": f"{image_url_base}/photo.png"},
                 {"type": "file", "data": str(media_dir / "photo.png")},
                 {"type": "base64", "data": image_b64(img)}):
        status, body = server.post("/generate", {"inputs": prompt, "parameters": {
            "max_new_tokens": N, "ignore_eos": True, "return_details": True},
            "multimodal_params": {"images": [item]}})
        assert status == 200, (item["type"], body)
        assert ids_of(body) == want, item["type"]
    status, body = server.post("/generate", {"inputs": "<image>", "multimodal_params": {"images": [
        {"type": "url", "data": f"{image_url_base}/missing.png"}]}})
    assert status == 400 and "returned HTTP 404" in body["message"]


def test_tokens_endpoint_counts_images(server, pipe, cases):
    prompt, images = cases["multi_image"]
    status, body = server.post("/tokens", gen_body(prompt, images))
    assert status == 200 and body["ntokens"] == len(pipe.prepare(prompt, images)[0])


def test_stop_sequence_over_http(server, pipe):
    prompt = "Tell me something."
    full = pipe.generate(prompt, gen_config=GenerationConfig(max_new_tokens=10, ignore_eos=True)).text
    stop = full[4:6]
    status, body = server.post("/generate", gen_body(prompt, max_new_tokens=10, ignore_eos=True,
                                                     stop_sequences=[stop]))
    assert status == 200
    assert body["finish_reason"] == "stop" and body["generated_text"] == [full[: full.index(stop)]]
    assert server.wait_metric("mmserver_kv_slots_used", 0) == 0


# ---------------------------------------------------------------------------------------
# Bad input: a 4xx naming the problem, and the server keeps serving.


@pytest.fixture(scope="module")
def silent_url():
    """A URL whose server accepts the connection and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    conns = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/image.png"
    stop.set()
    t.join()
    for c in conns:
        c.close()
    sock.close()


def _truncated_png_b64(img) -> str:
    """A PNG whose header is intact (the HTTP process reads only that) but whose pixel data
    stops half way: the ViT worker's decode fails, and that must still be the client's 400."""
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data = buf.getvalue()
    return base64.b64encode(data[:len(data) // 2]).decode()


def _bad_cases(image_factory_m, silent_url):
    img = image_b64(image_factory_m(64, 64, 1))
    truncated = _truncated_png_b64(image_factory_m(96, 80, 5))
    big = image_factory_m(1200, 1200, 2)  # noise PNG over the 3 MB cap
    return {
        "invalid_json": (b"{not json", 400, "invalid JSON"),
        "missing_inputs": ({"parameters": {}}, 400, "missing 'inputs'"),
        "unknown_parameter": ({"inputs": "x", "parameters": {"max_tokens": 3}}, 400, "unknown parameter(s): max_tokens"),
        "out_of_range": ({"inputs": "x", "parameters": {"temperature": -1}}, 400, "temperature"),
        "wrong_type": ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, 400, "max_new_tokens"),
        "broken_base64": ({"inputs": "<image>", "multimodal_params": {"images": [{"type": "base64", "data": "%%%"}]}},
                          400, "invalid base64"),
        "not_an_image": ({"inputs": "<image>", "multimodal_params": {"images": [
            {"type": "base64", "data": "aGVsbG8gd29ybGQ="}]}}, 400, "cannot decode as an image"),
        "truncated_image": ({"inputs": "<image>", "multimodal_params": {"images": [
            {"type": "base64", "data": truncated}]}}, 400, "image 0: cannot decode"),
        "truncated_second_image": ({"inputs": "<image><image>", "multimodal_params": {"images": [
            {"type": "base64", "data": img}, {"type": "base64", "data": truncated}]}}, 400, "image 1: cannot decode"),
        "url_no_answer": ({"inputs": "<image>", "multimodal_params": {"images": [{"type": "url", "data": silent_url}]}},
                          400, "timed out"),
        "image_too_large": ({"inputs": "<image>", "multimodal_params": {"images": [
            {"type": "base64", "data": image_b64(big, "BMP")}]}}, 413, "exceeds the 3000000-byte limit"),
        "too_many_images": ({"inputs": "<image>" * 4, "multimodal_params": {"images": [
            {"type": "base64", "data": img}] * 4}}, 400, "at most 3"),
        "placeholder_mismatch": ({"inputs": "<image> <image>", "multimodal_params": {"images": [
            {"type": "base64", "data": img}]}}, 400, "2 image placeholder(s)"),
        "image_without_placeholder": ({"inputs": "no placeholder", "multimodal_params": {"images": [
            {"type": "base64", "data": img}]}}, 400, "0 image placeholder(s)"),
        "prompt_too_long": ({"inputs": "word " * 9000}, 400, "exceeds max_req_total_len 8192"),
        "file_outside_allowed_dir": ({"inputs": "<image>", "multimodal_params": {"images": [
            {"type": "file", "data": "/etc/passwd"}]}}, 400, "outside the allowed directory"),
    }


BAD = ["invalid_json", "missing_inputs", "unknown_parameter", "out_of_range", "wrong_type", "broken_base64",
       "not_an_image", "truncated_image", "truncated_second_image", "url_no_answer", "image_too_large", "too_many_images", "placeholder_mismatch",
       "image_without_placeholder", "prompt_too_long", "file_outside_allowed_dir"]


def test_every_bad_case_is_run(image_factory_m, silent_url):
    """BAD names the parametrized cases; a case added to `_bad_cases` alone would never run."""
    assert sorted(BAD) == sorted(_bad_cases(image_factory_m, silent_url))


@pytest.mark.parametrize("name", BAD)
def test_bad_input(server, image_factory_m, silent_url, name):
    body, status, message = _bad_cases(image_factory_m, silent_url)[name]
    t0 = time.monotonic()
    got_status, got = server.post("/generate", body)
    assert got_status == status, got
    assert message in got["message"]
    assert time.monotonic() - t0 < 10  # bounded, even for the silent URL
    ok_status, ok = server.post("/generate", gen_body("still alive?", max_new_tokens=2, ignore_eos=True))
    assert ok_status == 200 and ok["count_output_tokens"] == 2


STAGES = ("http_intake", "visual", "router", "total")


def _stage_metrics(server) -> dict[str, tuple[float, float]]:
    m = server.metrics()
    return {s: (m[f'mmserver_ttft_stage_seconds_total{{stage="{s}"}}'],
                m[f'mmserver_ttft_stage_requests_total{{stage="{s}"}}']) for s in STAGES}


def test_ttft_breakdown_metrics(server, image_factory_m):
    # the router and visual processes report every 0.2 s: let earlier tests' requests settle
    assert server.wait_metric("mmserver_requests_in_flight", 0) == 0
    time.sleep(0.6)
    before = _stage_metrics(server)
    body = gen_body("<image> Describe it.", [image_factory_m(90, 70, 21)], max_new_tokens=2, ignore_eos=True)
    status, out = server.post("/generate", body)
    assert status == 200, out
    deadline = time.monotonic() + 10  # router and visual stats arrive every 0.2 s
    while time.monotonic() < deadline:
        after = _stage_metrics(server)
        if all(after[s][1] > before[s][1] for s in STAGES):
            break
        time.sleep(0.1)
    spent = {s: after[s][0] - before[s][0] for s in STAGES}
    assert all(after[s][1] == before[s][1] + 1 for s in STAGES), (before, after)
    assert all(spent[s] > 0 for s in STAGES), spent
    # the stages are consecutive parts of the time to the first token
    assert spent["http_intake"] + spent["visual"] + spent["router"] <= spent["total"] + 1e-3, spent


def test_client_disconnect_frees_kv(server):
    # 8000 tokens take minutes on CPU: the slots can only come back through the abort.
    body = json.dumps(gen_body("A long answer please.", max_new_tokens=8000, ignore_eos=True))
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/generate_stream", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data:")
    deadline = time.monotonic() + 10
    while server.metrics()["mmserver_kv_slots_used"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # router stats arrive every 0.2 s
    assert server.metrics()["mmserver_kv_slots_used"] > 0
    hang_up(conn, resp)  # mid-stream
    assert server.wait_metric("mmserver_requests_in_flight", 0) == 0
    assert server.wait_metric("mmserver_kv_slots_used", 0) == 0
    assert server.wait_metric("mmserver_running_requests", 0) == 0


def test_health_and_metrics(server):
    assert server.get("/health") == (200, '{"status": "ok"}')
    m = server.metrics()
    for name in ("mmserver_kv_slots_total", "mmserver_queue_length", "mmserver_embed_cache_bytes",
                 "mmserver_vit_tiles_total", 'mmserver_requests_total{outcome="ok"}'):
        assert name in m
    assert m["mmserver_kv_slots_total"] == 40000


def test_sigterm_leaves_nothing_behind(ckpt, tmp_path):
    srv = start_server(ckpt, "--enable_multimodal", "--max_total_token_num", "8192", log_dir=tmp_path)
    from conftest import random_image

    assert srv.post("/generate", gen_body("<image>\nhi", [random_image(448, 448, 3)], max_new_tokens=2))[0] == 200
    pid = srv.proc.pid
    assert shm_segments(pid), "the cache should hold a segment while running"
    assert len(srv.children) >= 3
    assert stop_server(srv) == 0
    deadline = time.monotonic() + 10
    while any(alive(c) for c in srv.children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in srv.children if alive(c)]
    assert shm_segments(pid) == []
