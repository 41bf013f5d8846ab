"""The real server on a tiny Qwen2.5-VL checkpoint (CPU) gives the pipeline's tokens (itself equal
to transformers, test_qwen2_vl.py): /generate and /v1/chat/completions alone, 4 and 16 requests at
once (mixed image sizes), request- and image-level min_pixels / max_pixels (a widening one is a
400 naming it), and precomputed embeddings with their grid_thw. Each runs on two servers: a
plain one, and one with --tp 2 --visual_tp 2 --overlap_schedule on and a --batch_max_tokens
that cuts images in two."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save

from conftest import random_image
from mmserver import GenerationConfig, pipeline
from server_util import gen_body, image_b64, start_server, stop_server

N = 6
MAX_PIXELS = 28 * 28 * 256
FLAGS = ["--enable_multimodal", "--max_total_token_num", "8192", "--max_req_total_len", "4096",
         "--running_max_req_size", "8", "--visual_infer_batch_size", "4"]
# 32 prompt tokens per prefill step: every image of more than 32 tokens is cut (most are)
PARALLEL = ["--tp", "2", "--visual_tp", "2", "--overlap_schedule", "on", "--batch_max_tokens", "32"]
SERVERS = {"plain": [], "parallel": PARALLEL}


@pytest.fixture(scope="module")
def qdir(qwen_checkpoints):
    return qwen_checkpoints("qwen2_5_vl", max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, qdir, tmp_path_factory):
    srv = start_server(qdir, *FLAGS, *SERVERS[request.param], log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    assert stop_server(srv) == 0


@pytest.fixture(scope="module")
def qpipe(qdir):
    return pipeline(qdir, device="cpu", dtype="float32")


def _gen(**kw):
    return GenerationConfig(max_new_tokens=N, ignore_eos=True, **kw)


def _ids(body) -> list[int]:
    return [t["id"] for t in body["tokens"]]


def _part(img, **opts):
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64(img), **opts}}


def test_generate_equals_pipeline(server, qpipe):
    images = [random_image(230, 150, 1), random_image(300, 250, 2)]
    prompt = qpipe.family.render_chat([{"role": "user", "content": "<image> and <image>: compare."}])
    status, body = server.post("/generate", gen_body(prompt, images, max_new_tokens=N, ignore_eos=True,
                                                     return_details=True))
    assert status == 200, body
    want = qpipe.generate(prompt, images=images, gen_config=_gen())
    assert _ids(body) == want.token_ids
    assert body["prompt_tokens"] == want.prompt_tokens


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


# 16 requests: /generate and chat, 0-2 images from 56×56 (the minimum) to 900×700 (capped)
_SIZES = [(56, 56), (100, 80), (230, 150), (300, 250), (640, 480), (150, 400), (900, 700), (500, 120)]


@pytest.fixture(scope="module")
def mixed_requests(qpipe):
    """(path, body, check) × 16; check(status, body) compares with the pipeline's answer."""
    out = []
    for i in range(16):
        imgs = [random_image(*_SIZES[(i + k) % len(_SIZES)], 100 + i + k) for k in range(i % 3)]
        text = f"Request {i}: what do you see?"
        if i % 2 == 0:
            prompt = qpipe.family.render_chat([{"role": "user", "content": "<image>" * len(imgs) + text}])
            want = qpipe.generate(prompt, images=imgs, gen_config=_gen()).token_ids
            out.append(("/generate", gen_body(prompt, imgs, max_new_tokens=N, ignore_eos=True, return_details=True),
                        lambda body, want=want: _ids(body) == want))
        else:
            content = [_part(im) for im in imgs] + [{"type": "text", "text": text}]
            want = qpipe([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": im}} for im in imgs]
                           + [{"type": "text", "text": text}]}], _gen()).text
            out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": N,
                                                 "ignore_eos": True, "temperature": 0},
                        lambda body, want=want: body["choices"][0]["message"]["content"] == want))
    return out


def test_video_and_image_equal_pipeline(server, qpipe):
    """A clip and an image in one prompt over /generate and /v1/chat/completions: the pipeline's
    tokens (itself transformers', test_qwen2_vl_video.py); with --tp 2 --visual_tp 2 too."""
    from mmserver import Video
    from video_util import make_clip

    clip = make_clip(n_frames=12, fps=6, seed=9)
    img = random_image(230, 150, 5)
    video = {"type": "base64", "data": base64.b64encode(clip).decode(), "max_pixels": 28 * 28 * 64}
    prompt = qpipe.family.render_chat([{"role": "user", "content": "<video><image>What changes?"}])
    body = gen_body(prompt, [img], max_new_tokens=N, ignore_eos=True, return_details=True)
    body["multimodal_params"]["videos"] = [video]
    status, out = server.post("/generate", body)
    assert status == 200, out
    want = qpipe.generate(prompt, images=[Video(clip, max_pixels=28 * 28 * 64), img], gen_config=_gen())
    assert _ids(out) == want.token_ids and out["prompt_tokens"] == want.prompt_tokens
    url = "data:video/mp4;base64," + video["data"]
    parts = [{"type": "video_url", "video_url": {"url": url, "max_pixels": 28 * 28 * 64}}, _part(img),
             {"type": "text", "text": "What changes?"}]
    status, out = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": parts}],
                                                       "max_tokens": N, "ignore_eos": True, "temperature": 0})
    assert status == 200, out
    local = qpipe([{"role": "user", "content": parts}], _gen())
    assert out["choices"][0]["message"]["content"] == local.text
    assert out["usage"]["prompt_tokens"] == local.prompt_tokens
    bad = dict(video, max_pixels=MAX_PIXELS * 2)
    body["multimodal_params"]["videos"] = [bad]
    status, out = server.post("/generate", body)
    assert status == 400 and "multimodal_params.videos[0].max_pixels" in out["message"], out


@pytest.mark.parametrize("count", [4, 16])
def test_concurrent_requests_equal_pipeline(server, mixed_requests, count):
    work = mixed_requests[:count]
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda item: server.post(item[0], item[1]), work))
    for i, ((status, body), (_, _, check)) in enumerate(zip(results, work)):
        assert status == 200, body
        assert check(body), (i, body)


def test_generate_pixel_options(server, qpipe):
    """parameters.min_pixels / max_pixels and an image item's own (which wins) narrow the range."""
    imgs = [random_image(640, 480, 7), random_image(200, 100, 8)]
    prompt = qpipe.family.render_chat([{"role": "user", "content": "<image><image>Compare."}])
    small = 28 * 28 * 32
    for params, item_opts, gen in [({"max_pixels": small}, [{}, {}], _gen(max_pixels=small)),
                                   ({"min_pixels": 28 * 28 * 40}, [{}, {}], _gen(min_pixels=28 * 28 * 40)),
                                   ({}, [{"max_pixels": small}, {}], None)]:
        body = gen_body(prompt, imgs, max_new_tokens=N, ignore_eos=True, return_details=True, **params)
        for item, opts in zip(body["multimodal_params"]["images"], item_opts):
            item.update(opts)
        status, got = server.post("/generate", body)
        assert status == 200, got
        if gen is not None:
            want = qpipe.generate(prompt, images=imgs, gen_config=gen)
        else:
            want = qpipe([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": imgs[0], **item_opts[0]}},
                                                       {"type": "image_url", "image_url": {"url": imgs[1]}},
                                                       {"type": "text", "text": "Compare."}]}], _gen())
        assert _ids(got) == want.token_ids and got["prompt_tokens"] == want.prompt_tokens
    full = qpipe.generate(prompt, images=imgs, gen_config=_gen()).prompt_tokens
    assert got["prompt_tokens"] < full
    # wider than the server's range, or empty: 400 naming the option as written
    for params, item, name in [({"max_pixels": MAX_PIXELS + 1}, {}, "'max_pixels'"),
                               ({"min_pixels": 3135}, {}, "'min_pixels'"),
                               ({"min_pixels": 9000, "max_pixels": 8000}, {}, "max_pixels"),
                               ({}, {"max_pixels": MAX_PIXELS * 2}, "multimodal_params.images[1].max_pixels"),
                               ({"max_pixels": "big"}, {}, "'max_pixels'")]:
        body = gen_body(prompt, imgs, max_new_tokens=1, **params)
        body["multimodal_params"]["images"][1].update(item)
        status, got = server.post("/generate", body)
        assert status == 400 and name in got["message"], (params, item, got)


def _embeds_b64(qpipe, img) -> tuple[str, list[int]]:
    """The image's rows from the pipeline's own ViT, as the server takes them, and its grid."""
    x = qpipe.family.preprocess(img, qpipe.family.image_options({}, {}), normalize=True)
    [rows] = qpipe.model.vision.encode_images([x])
    return base64.b64encode(save({"embeds": rows.contiguous()})).decode(), list(x.grid)


def test_precomputed_embeddings_with_grid(server, qpipe):
    """Embeddings + grid_thw give the tokens of the same image sent as pixels (/generate, chat
    and the pipeline); a missing or mismatching grid is a 400 naming grid_thw."""
    img = random_image(300, 250, 9)
    data, grid = _embeds_b64(qpipe, img)
    prompt = qpipe.family.render_chat([{"role": "user", "content": "<image>Describe."}])
    want = qpipe.generate(prompt, images=[img], gen_config=_gen())
    body = gen_body(prompt, max_new_tokens=N, ignore_eos=True, return_details=True)
    body["multimodal_params"] = {"images": [{"type": "embeds", "data": data, "grid_thw": grid}]}
    status, got = server.post("/generate", body)
    assert status == 200, got
    assert _ids(got) == want.token_ids and got["prompt_tokens"] == want.prompt_tokens

    part = {"type": "image_embeds", "image_embeds": data, "grid_thw": grid}
    chat = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}],
            "max_tokens": N, "ignore_eos": True, "temperature": 0}
    status, got = server.post("/v1/chat/completions", chat)
    assert status == 200, got
    local = qpipe([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                {"type": "text", "text": "Describe."}]}], _gen())
    assert got["choices"][0]["message"]["content"] == local.text

    for bad, msg in [(None, "is required"), ([1, grid[1], grid[2] + 2], "rows"), ([1, 4], "three positive")]:
        given = {} if bad is None else {"grid_thw": bad}
        body["multimodal_params"] = {"images": [{"type": "embeds", "data": data, **given}]}
        status, got = server.post("/generate", body)
        assert status == 400 and "multimodal_params.images[0].grid_thw" in got["message"] \
            and msg in got["message"], got
        chat["messages"][0]["content"][0] = {"type": "image_embeds", "image_embeds": data, **given}
        status, got = server.post("/v1/chat/completions", chat)
        assert status == 400 and got["error"]["param"] == "messages[0].content[0].grid_thw", got


def test_pipeline_embeddings_with_grid(qpipe):
    img = random_image(230, 150, 10)
    x = qpipe.family.preprocess(img, qpipe.family.image_options({}, {}), normalize=True)
    [rows] = qpipe.model.vision.encode_images([x])
    want = qpipe(("Describe.", img), _gen())
    for source in [(rows, list(x.grid)), (rows, torch.tensor(x.grid)), {"embeds": rows, "grid_thw": x.grid}]:
        assert qpipe(("Describe.", source), _gen()).token_ids == want.token_ids
        assert qpipe(("Describe.", [source]), _gen()).token_ids == want.token_ids
    prompt = qpipe.family.render_chat([{"role": "user", "content": "<image>Describe."}])
    assert qpipe.generate(prompt, images=(rows, list(x.grid)), gen_config=_gen()).token_ids == \
        qpipe.generate(prompt, images=[img], gen_config=_gen()).token_ids
    msg = [{"role": "user", "content": [{"type": "image_embeds", "image_embeds": rows, "grid_thw": list(x.grid)},
                                        {"type": "text", "text": "Describe."}]}]
    assert qpipe(msg, _gen()).token_ids == want.token_ids
    with pytest.raises(ValueError, match="grid_thw is required"):
        qpipe(("Describe.", rows), _gen())
    with pytest.raises(ValueError, match="grid_thw"):
        qpipe(("Describe.", (rows, [1, 2, 2])), _gen())


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
        status, body = srv.post("/generate", gen_body("<image>hi", [img], max_new_tokens=1, max_pixels=MAX_PIXELS))
        assert status == 400 and "'max_pixels'" in body["message"]
    finally:
        stop_server(srv)
