"""The real server on a tiny LLaVA-NeXT (Mistral) checkpoint (CPU): /generate and
/v1/chat/completions give the pipeline's tokens (itself equal to transformers, test_llava.py),
with the image token counts planned from the image header alone."""

from __future__ import annotations

import pytest

from conftest import random_image
from mmserver import GenerationConfig, pipeline
from server_util import gen_body, image_b64, start_server, stop_server

N = 6
FLAGS = ["--enable_multimodal", "--max_total_token_num", "16384", "--max_req_total_len", "8192",
         "--running_max_req_size", "8", "--visual_infer_batch_size", "4"]


@pytest.fixture(scope="module")
def ldir(llava_checkpoints):
    return llava_checkpoints("llava_next", "mistral")


@pytest.fixture(scope="module")
def server(ldir, tmp_path_factory):
    srv = start_server(ldir, *FLAGS, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def lpipe(ldir):
    return pipeline(ldir, device="cpu", dtype="float32", max_total_tokens=16384, max_req_len=8192)


def _gen(**kw):
    return GenerationConfig(max_new_tokens=N, ignore_eos=True, **kw)


def test_generate_equals_pipeline(server, lpipe):
    images = [random_image(900, 300, 1), random_image(250, 700, 2)]
    prompt = lpipe.family.render_chat([{"role": "user", "content": "<image>\n<image>\ncompare."}])
    status, body = server.post("/generate", gen_body(prompt, images, max_new_tokens=N, ignore_eos=True,
                                                     return_details=True))
    assert status == 200, body
    want = lpipe.generate(prompt, images=images, gen_config=_gen())
    assert [t["id"] for t in body["tokens"]] == want.token_ids
    assert body["prompt_tokens"] == want.prompt_tokens


def test_chat_completions_equals_pipeline(server, lpipe):
    img = random_image(640, 480, 3)
    url = "data:image/png;base64," + image_b64(img)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is it?"}]}]
    status, body = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": N, "ignore_eos": True,
                                                        "temperature": 0})
    assert status == 200, body
    local = lpipe([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                {"type": "text", "text": "What is it?"}]}], _gen())
    assert body["choices"][0]["message"]["content"] == local.text
    assert body["usage"]["prompt_tokens"] == local.prompt_tokens
