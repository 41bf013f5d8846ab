"""The real server on a tiny Qwen2.5-VL checkpoint (CPU): /generate and /v1/chat/completions
give the pipeline's tokens (itself equal to transformers, test_qwen2_vl.py); an image part's
max_pixels narrows its grid, and a wider one is refused with a 400 naming it."""

from __future__ import annotations

import pytest

from conftest import random_image
from mmserver import GenerationConfig, pipeline
from server_util import gen_body, image_b64, start_server, stop_server

N = 6
MAX_PIXELS = 28 * 28 * 256
FLAGS = ["--enable_multimodal", "--max_total_token_num", "8192", "--max_req_total_len", "4096",
         "--running_max_req_size", "8", "--visual_infer_batch_size", "4", "--overlap_schedule", "on"]


@pytest.fixture(scope="module")
def qdir(qwen_checkpoints):
    return qwen_checkpoints("qwen2_5_vl", max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def server(qdir, tmp_path_factory):
    srv = start_server(qdir, *FLAGS, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def qpipe(qdir):
    return pipeline(qdir, device="cpu", dtype="float32")


def _gen(**kw):
    return GenerationConfig(max_new_tokens=N, ignore_eos=True, **kw)


def test_generate_equals_pipeline(server, qpipe):
    images = [random_image(230, 150, 1), random_image(300, 250, 2)]
    prompt = qpipe.family.render_chat([{"role": "user", "content": "<image> and <image>: compare."}])
    status, body = server.post("/generate", gen_body(prompt, images, max_new_tokens=N, ignore_eos=True,
                                                     return_details=True))
    assert status == 200, body
    want = qpipe.generate(prompt, images=images, gen_config=_gen())
    assert [t["id"] for t in body["tokens"]] == want.token_ids
    assert body["prompt_tokens"] == want.prompt_tokens


def _part(img, **opts):
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64(img), **opts}}


def test_chat_completions_equals_pipeline(server, qpipe):
    img = random_image(640, 480, 3)
    for opts in ({}, {"max_pixels": 28 * 28 * 64}):
        messages = [{"role": "user", "content": [_part(img, **opts), {"type": "text", "text": "What is it?"}]}]
        status, body = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": N,
                                                            "ignore_eos": True, "temperature": 0})
        assert status == 200, body
        local = qpipe([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": img, **opts}}, {"type": "text", "text": "What is it?"}]}], _gen())
        assert body["choices"][0]["message"]["content"] == local.text
        assert body["usage"]["prompt_tokens"] == local.prompt_tokens
    status, body = server.post("/v1/chat/completions", {"max_tokens": 2, "messages": [
        {"role": "user", "content": [_part(img, max_pixels=MAX_PIXELS * 2)]}]})
    assert status == 400 and "max_pixels" in str(body)


def test_max_pixels_flag(qdir, tmp_path):
    """--max_pixels lowers the server's range: the same image costs fewer tokens, and a request
    asking for the checkpoint's range is refused."""
    srv = start_server(qdir, *FLAGS, "--max_pixels", str(28 * 28 * 64), log_dir=tmp_path)
    try:
        img = random_image(640, 480, 3)
        status, body = srv.post("/generate", gen_body("<image>hi", [img], max_new_tokens=1, return_details=True))
        assert status == 200, body
        assert body["prompt_tokens"] <= 64 + 3
        status, body = srv.post("/v1/chat/completions", {"max_tokens": 1, "messages": [
            {"role": "user", "content": [_part(img, max_pixels=MAX_PIXELS)]}]})
        assert status == 400 and "max_pixels" in str(body)
    finally:
        stop_server(srv)
