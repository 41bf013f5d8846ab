"""The OpenAI-compatible API and precomputed embeddings, end to end: the real server on CPU,
the official `openai` client, compared with /generate and with the in-process pipeline."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import time

import openai
import pytest
import torch
from safetensors.torch import save

from conftest import random_image
from mmserver import GenerationConfig
from mmserver.models.internvl.preprocess import num_tiles, preprocess_image
from server_util import hang_up, image_b64, serve_directory, shm_segments, start_server, stop_server

N = 5
MAX_LEN = 4096  # --max_req_total_len
FLAGS = ["--enable_multimodal", "--max_total_token_num", "30000", "--max_req_total_len", str(MAX_LEN),
         "--max_images_per_request", "4", "--image_fetch_timeout", "2",
         # image URLs from a loopback server, and only from 127.0.0.1
         "--allow_private_media_urls", "--allowed_media_domains", "127.0.0.1"]


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    srv = start_server(ckpt, *FLAGS, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def img():
    return random_image(448, 448, 41)


def data_url(image) -> str:
    return "data:image/png;base64," + image_b64(image)


def image_part(image, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image), **extra}}


def chat(client, messages, max_tokens: int = N, **kw):
    return client.chat.completions.create(model="any", messages=messages, max_tokens=max_tokens,
                                          extra_body={"ignore_eos": True}, **kw)


def generate(server, prompt: str, images=(), n: int = N) -> dict:
    """/generate with `images` given as {"type", "data"} items or PIL images."""
    items = [im if isinstance(im, dict) else {"type": "base64", "data": image_b64(im)} for im in images]
    status, body = server.post("/generate", {"inputs": prompt, "multimodal_params": {"images": items},
                                             "parameters": {"max_new_tokens": n, "ignore_eos": True,
                                                            "return_details": True}})
    assert status == 200, body
    return body


def render(pipe, messages: list[dict]) -> str:
    return pipe.family.render_chat(messages)


def embeds_b64(rows: torch.Tensor) -> str:
    return base64.b64encode(save({"embeds": rows.contiguous()})).decode()


def vit_rows(pipe, image, max_num: int = 12) -> torch.Tensor:
    """The embeddings the model's own ViT gives `image`: [tiles·256, hidden]."""
    tiles = preprocess_image(image, max_num=max_num)
    return pipe.model.vision.encode(tiles).reshape(-1, pipe.cfg.llm.hidden_size)


# ---------------------------------------------------------------------------------------
# Chat completions


def test_chat_equals_generate_and_pipeline(server, client, pipe, img):
    r = chat(client, [{"role": "user", "content": [image_part(img), {"type": "text", "text": "What is it?"}]}])
    want = generate(server, render(pipe, [{"role": "user", "content": "<image>\nWhat is it?"}]), [img])
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want["generated_text"][0]
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == want["prompt_tokens"] and r.usage.completion_tokens == N
    assert r.usage.total_tokens == want["prompt_tokens"] + N
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    # the offline pipeline, same conversation: same tokens and text
    local = pipe(("What is it?", img), GenerationConfig(max_new_tokens=N, ignore_eos=True))
    assert local.token_ids == [t["id"] for t in want["tokens"]]
    assert local.text == choice.message.content and local.prompt_tokens == r.usage.prompt_tokens


def test_stream_equals_non_stream(server, client, pipe, img):
    messages = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "Describe."}]}]
    whole = chat(client, messages)
    chunks = list(chat(client, messages, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body, usage = chunks[:-1], chunks[-1]
    full = ""
    for c in body:  # every chunk with a choice carries content as a string, the last one too
        full += c.choices[0].delta.content
    assert full == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["length"]
    assert usage.choices == [] and usage.usage.completion_tokens == N
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    plain = list(chat(client, messages, stream=True))  # without include_usage: no usage chunk
    assert plain[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in plain)
    status, events = sse(server, {"messages": messages, "max_tokens": 2, "stream": True})
    assert status == 200 and events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"]
    assert all(isinstance(json.loads(e)["choices"][0]["delta"]["content"], str) for e in events[:-1])


def test_stream_stops_like_non_stream(client):
    """A stop string: same text and finish_reason streamed or not."""
    messages = [{"role": "user", "content": "Say something long."}]
    free = chat(client, messages, max_tokens=12).choices[0].message.content
    stop = free[5:7]
    whole = chat(client, messages, max_tokens=12, stop=[stop])
    full, reasons = "", []
    for c in chat(client, messages, max_tokens=12, stop=[stop], stream=True):
        full += c.choices[0].delta.content
        reasons.append(c.choices[0].finish_reason)
    assert whole.choices[0].finish_reason == "stop" and reasons[-1] == "stop"
    assert full == whole.choices[0].message.content == free[:free.index(stop)]


def sse(server, body: dict) -> tuple[int, list[str]]:
    """The raw `data:` payloads of a streamed chat completion."""
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def test_two_images_two_turns(server, client, pipe):
    a, b = random_image(200, 400, 42), random_image(300, 300, 43)  # 3 tiles and 1
    messages = [
        {"role": "system", "content": "You compare pictures."},
        {"role": "user", "content": [image_part(a), image_part(b), {"type": "text", "text": "Compare them."}]},
        {"role": "assistant", "content": "The first is taller."},
        {"role": "user", "content": "And the colors?"},
    ]
    r = client.chat.completions.create(model="any", messages=messages, max_completion_tokens=N,
                                       extra_body={"ignore_eos": True})
    prompt = render(pipe, [{**m, "content": c} for m, c in zip(messages, [
        "You compare pictures.", "<image>\n<image>\nCompare them.", "The first is taller.", "And the colors?"])])
    want = generate(server, prompt, [a, b])
    assert r.choices[0].message.content == want["generated_text"][0]
    assert r.usage.prompt_tokens == want["prompt_tokens"]


def test_max_dynamic_patch_per_image(client):
    wide = random_image(1344, 448, 44)
    text = {"type": "text", "text": "hi"}
    default = chat(client, [{"role": "user", "content": [image_part(wide), text]}], max_tokens=1)
    capped = chat(client, [{"role": "user", "content": [image_part(wide, max_dynamic_patch=2), text]}], max_tokens=1)
    fewer = num_tiles(1344, 448, max_num=12) - num_tiles(1344, 448, max_num=2)  # (3,1) vs (2,1), + thumbnails
    assert fewer == 1 and default.usage.prompt_tokens - capped.usage.prompt_tokens == fewer * 256


def test_no_max_tokens_fills_the_context(client, pipe):
    """Without max_tokens the answer may use all the room the prompt leaves in max_req_total_len."""
    def prompt_len(k: int) -> int:
        return len(pipe.prepare(render(pipe, [{"role": "user", "content": "x" * k}]))[0])

    k = MAX_LEN - 100
    k += MAX_LEN - 3 - prompt_len(k)  # the tiny tokenizer: one token per "x"; leave room for 3
    n = prompt_len(k)
    assert MAX_LEN - 10 < n < MAX_LEN
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "x" * k}],
                                       extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens == MAX_LEN - n
    assert r.choices[0].finish_reason == "length"


def test_models(client, ckpt):
    assert [m.id for m in client.models.list().data] == [ckpt.name]


BAD = {
    "missing_messages": ({"model": "m"}, "'messages' is required", "messages"),
    "bad_role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of",
                 "messages[0].role"),
    "bad_image_url": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "ftp://example.com/x.png"}}]}]}, "must be an http(s) URL", "messages[0].content[0].image_url.url"),
    "unreachable_image_url": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://127.0.0.1:9/x.png"}}]}]}, "image 0: cannot fetch", None),
    "unknown_part": ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
                     "content[0].type 'audio' is not one of", "messages[0].content[0].type"),
    "n_over_max": ({"messages": [{"role": "user", "content": "hi"}], "n": 9},
                   "'n' must be an integer in [1, 8] (--max_n), got 9", "n"),
    "n_zero": ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "'n' must be an integer", "n"),
    "bad_temperature": ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
                        "'temperature' must be a", "temperature"),
    "unsupported_tools": ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
                          "unsupported parameter(s): tools", "tools"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_requests(server, name):
    body, message, param = BAD[name]
    status, got = server.post("/v1/chat/completions", body)
    assert status == 400, got
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["type"] == "invalid_request_error" and message in got["error"]["message"]
    assert got["error"]["param"] == param
    ok_status, ok = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "still there?"}],
                                                         "max_tokens": 2})
    assert ok_status == 200 and ok["usage"]["completion_tokens"] <= 2


def test_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], n=9)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"


def test_error_shapes_per_api(server):
    """One error middleware: the OpenAI shape under /v1, LightLLM's elsewhere."""
    status, body = server.post("/v1/chat/completions", {"messages": []})
    assert status == 400 and set(body) == {"error"} and body["error"]["param"] == "messages"
    status, body = server.post("/generate", {"parameters": {}})
    assert status == 400 and body == {"message": "missing 'inputs'"}
    assert server.post("/generate", {"inputs": "ok?", "parameters": {"max_new_tokens": 2}})[0] == 200


def test_image_urls_under_the_allow_list(server, client, img, tmp_path):
    """--allowed_media_domains 127.0.0.1 with --allow_private_media_urls: 127.0.0.1 is fetched;
    another name for the same server, directly or by a redirect, is refused."""
    img.save(tmp_path / "photo.png")
    text = {"type": "text", "text": "What is it?"}
    with serve_directory(tmp_path) as base:
        port = base.rsplit(":", 1)[1]
        by_url = chat(client, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{base}/photo.png"}}, text]}])
        by_data = chat(client, [{"role": "user", "content": [image_part(img), text]}])
        assert by_url.choices[0].message.content == by_data.choices[0].message.content
        status, body = server.post("/v1/chat/completions", {"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"http://localhost:{port}/photo.png"}}, text]}]})
        assert status == 400, body
        assert body["error"]["message"] == "image 0: URL host localhost is not in --allowed_media_domains; refused"
    with serve_redirect(f"http://localhost:{port}/photo.png") as start:
        status, body = server.post("/generate", {"inputs": "<image>", "multimodal_params": {"images": [
            {"type": "url", "data": start}]}})
        assert status == 400, body
        assert body["message"] == (f"image 0: redirect 1 to http://localhost:{port}/photo.png: URL host localhost "
                                   f"is not in --allowed_media_domains; refused")
    assert server.post("/generate", {"inputs": "fine", "parameters": {"max_new_tokens": 2}})[0] == 200


@contextlib.contextmanager
def serve_redirect(location: str):
    """A loopback server answering every GET with a 302 to `location`."""
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/image.png"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# ---------------------------------------------------------------------------------------
# n samples


SAY = [{"role": "user", "content": "Tell me a story."}]


def test_n_seeded_samples_are_reproducible(client):
    r = chat(client, SAY, n=3, seed=11, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # independent samples (random weights: near-uniform tokens)
    again = chat(client, SAY, n=3, seed=11, temperature=1.0)
    assert [c.message.content for c in again.choices] == texts
    # choice i is the sample of seed + i
    assert chat(client, SAY, seed=12, temperature=1.0).choices[0].message.content == texts[1]
    single = chat(client, SAY, seed=11, temperature=1.0)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens == 3 * N and r.usage.total_tokens == r.usage.prompt_tokens + 3 * N


def test_n_streamed_equals_non_streamed(client):
    whole = chat(client, SAY, n=2, seed=5, temperature=1.0)
    texts, reasons, usage = ["", ""], [None, None], None
    for c in chat(client, SAY, n=2, seed=5, temperature=1.0, stream=True, stream_options={"include_usage": True}):
        if not c.choices:
            usage = c.usage
            continue
        choice = c.choices[0]
        texts[choice.index] += choice.delta.content
        reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == ["length", "length"]
    assert usage.completion_tokens == 2 * N and usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_unseeded_samples_differ(client):
    r = chat(client, SAY, n=3, temperature=1.0)
    assert len({c.message.content for c in r.choices}) > 1


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_all_n(server, stream):
    body = json.dumps({"messages": SAY, "n": 3, "max_tokens": 3000, "ignore_eos": True, "stream": stream})
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = None
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    else:
        assert server.wait_metric("mmserver_requests_in_flight", 3) == 3
    hang_up(conn, resp)
    assert server.wait_metric("mmserver_requests_in_flight", 0) == 0
    assert server.wait_metric("mmserver_kv_slots_used", 0) == 0
    assert server.post("/v1/chat/completions", {"messages": SAY, "max_tokens": 2})[0] == 200


# ---------------------------------------------------------------------------------------
# /metrics histograms

HISTOGRAMS = ("mmserver_time_to_first_token_seconds", "mmserver_time_per_output_token_seconds",
              "mmserver_e2e_request_latency_seconds", "mmserver_request_queue_time_seconds",
              "mmserver_request_prompt_tokens", "mmserver_request_generation_tokens")


def test_request_histograms(server, client):
    assert server.wait_metric("mmserver_requests_in_flight", 0) == 0
    before = server.metrics()
    for k in range(3):
        chat(client, [{"role": "user", "content": f"count {k}"}], max_tokens=3)
    after = server.metrics()
    for name in HISTOGRAMS:
        assert after[f"{name}_count"] - before.get(f"{name}_count", 0) == 3, name
        buckets = [(float(key.split('le="')[1].rstrip('"}')), v) for key, v in after.items()
                   if key.startswith(f"{name}_bucket{{")]
        counts = [v for _, v in sorted(buckets)]
        assert len(counts) > 3 and counts == sorted(counts) and counts[-1] == after[f"{name}_count"], name
    assert after["mmserver_request_generation_tokens_sum"] - before["mmserver_request_generation_tokens_sum"] == 9
    for name in ("mmserver_requests_total{outcome=\"ok\"}", "mmserver_kv_slots_total", "mmserver_queue_length",
                 "mmserver_embed_cache_hits_total", 'mmserver_ttft_stage_requests_total{stage="total"}'):
        assert name in after, name


# ---------------------------------------------------------------------------------------
# Precomputed embeddings


def emb_in_segments(server) -> list[str]:
    return [s for s in shm_segments(server.proc.pid) if "emb-in-" in s]


def test_embeds_equal_image_over_generate(server, pipe, img):
    prompt = "<image>\nWhat is in the picture?"
    rows = vit_rows(pipe, img)
    by_image = generate(server, prompt, [img])
    by_embeds = generate(server, prompt, [{"type": "embeds", "data": embeds_b64(rows)}])
    assert [t["id"] for t in by_embeds["tokens"]] == [t["id"] for t in by_image["tokens"]]
    assert by_embeds["prompt_tokens"] == by_image["prompt_tokens"]
    half = generate(server, prompt, [{"type": "embeds", "data": embeds_b64(rows.to(torch.bfloat16))}])
    assert half["count_output_tokens"] == N  # any float dtype is accepted (cast to the model's)
    assert emb_in_segments(server) == []


def test_embeds_equal_image_over_chat(client, pipe):
    wide = random_image(900, 500, 45)
    text = {"type": "text", "text": "Describe."}
    rows = vit_rows(pipe, wide, max_num=4)
    by_image = chat(client, [{"role": "user", "content": [image_part(wide, max_dynamic_patch=4), text]}])
    by_embeds = chat(client, [{"role": "user", "content": [
        {"type": "image_embeds", "image_embeds": embeds_b64(rows)}, text]}])
    assert by_embeds.choices[0].message.content == by_image.choices[0].message.content
    assert by_embeds.usage.prompt_tokens == by_image.usage.prompt_tokens


def test_embeds_mixed_with_images(server, pipe):
    a, b = random_image(448, 448, 46), random_image(600, 300, 47)
    prompt = "Image-1: <image>\nImage-2: <image>\nCompare."
    want = generate(server, prompt, [a, b])
    got = generate(server, prompt, [a, {"type": "embeds", "data": embeds_b64(vit_rows(pipe, b))}])
    assert [t["id"] for t in got["tokens"]] == [t["id"] for t in want["tokens"]]
    assert emb_in_segments(server) == []


def test_embeds_wrong_shape_names_the_expected_shape(server, client):
    bad = embeds_b64(torch.zeros(300, 64))
    status, body = server.post("/generate", {"inputs": "<image>\nhi", "multimodal_params": {
        "images": [{"type": "embeds", "data": bad}]}})
    assert status == 400 and "embeds 0: shape (300, 64) is not [k·256, 64]" in body["message"]
    with pytest.raises(openai.BadRequestError, match=r"embeds 0: shape \(300, 64\) is not \[k·256, 64\]"):
        client.chat.completions.create(model="any", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_embeds", "image_embeds": bad}]}])
    two = base64.b64encode(save({"a": torch.zeros(256, 64), "b": torch.zeros(256, 64)})).decode()
    status, body = server.post("/generate", {"inputs": "<image>", "multimodal_params": {
        "images": [{"type": "embeds", "data": two}]}})
    assert status == 400 and "expected exactly one" in body["message"]
    status, body = server.post("/generate", {"inputs": "<image>", "multimodal_params": {
        "images": [{"type": "embeds", "data": base64.b64encode(b"not safetensors").decode()}]}})
    assert status == 400 and "not a safetensors file" in body["message"]
    assert server.post("/generate", {"inputs": "fine", "parameters": {"max_new_tokens": 2}})[0] == 200
    assert emb_in_segments(server) == []


def test_embeds_segment_freed_on_disconnect(server, pipe, img):
    body = json.dumps({"inputs": "<image>\nA long answer please.", "parameters": {
        "max_new_tokens": 3500, "ignore_eos": True}, "multimodal_params": {
        "images": [{"type": "embeds", "data": embeds_b64(vit_rows(pipe, img))}]}})
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/generate_stream", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data:")
    assert len(emb_in_segments(server)) == 1  # held while the request runs
    hang_up(conn, resp)  # mid-stream
    assert server.wait_metric("mmserver_requests_in_flight", 0) == 0
    deadline = time.monotonic() + 10
    while emb_in_segments(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emb_in_segments(server) == []
