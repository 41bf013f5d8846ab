"""Videos over HTTP on the real server (InternVL, CPU): /generate's multimodal_params.videos and
the official openai client's video_url parts give the pipeline's tokens; a repeated video is
an embedding-cache hit; every bad video is a 4xx naming it, and the server keeps serving."""

from __future__ import annotations

import base64
import io

import av
import openai
import pytest

from mmserver import GenerationConfig, Video
from mmserver.models.internvl.prompt import frames_prompt
from mmserver.models.video_io import decode_frames, internvl_indices
from server_util import gen_body, image_b64, serve_directory, start_server, stop_server
from video_util import make_clip

N = 6
QUESTION = "What happens?"
MAX_FRAMES = 8
BUDGET_FRAMES = 6  # the pixel budget holds 6 one-tile frames: the default 8 segments are over it


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory, media_dir):
    srv = start_server(ckpt, "--enable_multimodal", "--max_total_token_num", "20000", "--max_req_total_len", "8192",
                       "--max_video_frames", str(MAX_FRAMES), "--max_video_pixels", str(BUDGET_FRAMES * 448 * 448),
                       "--max_video_bytes", "10000", "--allowed_local_media_path", str(media_dir),
                       "--allow_private_media_urls", log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_clip(n_frames=12, fps=6, width=64, height=48, seed=3)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def video_body(prompt: str, data: bytes, *, n=N, **video) -> dict:
    body = gen_body(prompt, max_new_tokens=n, ignore_eos=True)
    body["multimodal_params"] = {"videos": [{"type": "base64", "data": b64(data), **video}]}
    return body


def ids_of(body: dict) -> list[int]:
    return [t["id"] for t in body["tokens"]]


def generate_ids(server, body) -> list[int]:
    body["parameters"]["return_details"] = True
    status, out = server.post("/generate", body)
    assert status == 200, out
    return ids_of(out)


def test_generate_video_equals_its_frames_as_images(server, pipe, clip):
    got = generate_ids(server, video_body("<video>" + QUESTION, clip, num_frames=4))
    frames = decode_frames(clip, internvl_indices(12, 4))
    as_images = generate_ids(server, gen_body(frames_prompt(4) + QUESTION, frames, max_new_tokens=N, ignore_eos=True,
                                              image_max_patch_num=1))
    expected = pipe.generate("<video>" + QUESTION, images=[Video(clip, num_frames=4)],
                             gen_config=GenerationConfig(max_new_tokens=N, ignore_eos=True)).token_ids
    assert got == as_images == expected
    # the request's num_frames reaches the video too
    body = video_body("<video>" + QUESTION, clip)
    body["parameters"]["num_frames"] = 4
    assert generate_ids(server, body) == got


def test_file_url_and_stream(server, clip, media_dir):
    want = generate_ids(server, video_body("<video>" + QUESTION, clip, num_frames=3))
    (media_dir / "clip.mp4").write_bytes(clip)
    body = video_body("<video>" + QUESTION, clip, num_frames=3)
    body["multimodal_params"]["videos"][0].update(type="file", data=str(media_dir / "clip.mp4"))
    assert generate_ids(server, body) == want
    with serve_directory(media_dir) as base:
        body["multimodal_params"]["videos"][0].update(type="url", data=f"{base}/clip.mp4")
        assert generate_ids(server, body) == want
    status, events = server.stream(video_body("<video>" + QUESTION, clip, num_frames=3))
    assert status == 200 and [e["token"]["id"] for e in events] == want


def test_openai_client_video_url(server, pipe, clip):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    url = "data:video/mp4;base64," + b64(clip)
    content = [{"type": "video_url", "video_url": {"url": url, "num_frames": 4}}, {"type": "text", "text": QUESTION}]
    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=N)
    expected = pipe([{"role": "user", "content": content}], gen_config=GenerationConfig(max_new_tokens=N))
    assert resp.choices[0].message.content == expected.text
    assert resp.usage.prompt_tokens == expected.prompt_tokens
    assert resp.usage.prompt_tokens > 4 * 256  # four frames of 256 tokens
    # the request-level sampling (vLLM's mm_processor_kwargs) for a part that sets none
    bare = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    same = client.chat.completions.create(model="m", messages=[{"role": "user", "content": bare}], max_tokens=N,
                                          extra_body={"mm_processor_kwargs": {"num_frames": 4}})
    assert same.choices[0].message.content == expected.text and same.usage.prompt_tokens == expected.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="mm_processor_kwargs"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": bare}], max_tokens=N,
                                       extra_body={"mm_processor_kwargs": {"frames": 4}})
    with pytest.raises(openai.BadRequestError, match="video_url.url"):
        client.chat.completions.create(model="m", max_tokens=N, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "ftp://x/clip.mp4"}}]}])


def test_repeated_video_is_a_cache_hit(server, clip):
    other = make_clip(n_frames=10, fps=5, seed=11)
    before = server.settled_metrics()
    first = generate_ids(server, video_body("<video>Again?", other, num_frames=2))
    mid = server.settled_metrics()
    second = generate_ids(server, video_body("<video>Again?", other, num_frames=2))
    after = server.settled_metrics()
    assert first == second
    assert mid["mmserver_embed_cache_misses_total"] == before["mmserver_embed_cache_misses_total"] + 1
    assert after["mmserver_embed_cache_hits_total"] == mid["mmserver_embed_cache_hits_total"] + 1
    assert after["mmserver_vit_images_total"] == mid["mmserver_vit_images_total"]  # the ViT did not run again
    # other sampling options are another cache entry
    generate_ids(server, video_body("<video>Again?", other, num_frames=3))
    assert server.settled_metrics()["mmserver_embed_cache_misses_total"] == \
        after["mmserver_embed_cache_misses_total"] + 1


def _no_frames() -> bytes:
    """An mp4 whose video track never got a frame (FFmpeg then writes no track at all)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=6)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    return buf.getvalue()


def test_bad_videos_get_4xx_and_the_server_keeps_serving(server, clip, image_factory):
    png = base64.b64decode(image_b64(image_factory(64, 48, 1)))
    cases = [
        (video_body("<video>hi", b"this is not a video " * 20, num_frames=2), 400, "video 0"),
        (video_body("<video>hi", clip[:len(clip) // 2], num_frames=2), 400, "video 0"),
        (video_body("<video>hi", _no_frames(), num_frames=2), 400, "video 0"),
        (video_body("<video>hi", png[:40], num_frames=2), 400, "video 0"),
        (video_body("<video>hi", clip, num_frames=MAX_FRAMES + 1), 400, "num_frames"),
        (video_body("<video>hi", clip, num_frames=2, fps=1), 400, "num_frames"),
        (video_body("<video>hi", clip, fps=0), 400, "fps"),
        (video_body("<video>hi", clip), 413, "--max_video_pixels"),  # 8 default segments > the 6-frame budget
        (video_body("<video>hi", make_clip(n_frames=40, fps=10, width=320, height=240), num_frames=2), 413,
         "byte limit"),
        (video_body("hi", clip, num_frames=2), 400, "video placeholder"),
        (video_body("<video><video>hi", clip, num_frames=2), 400, "video placeholder"),
    ]
    bad_b64 = video_body("<video>hi", clip)
    bad_b64["multimodal_params"]["videos"][0]["data"] = "***"
    bad_type = video_body("<video>hi", clip)
    bad_type["multimodal_params"]["videos"][0]["type"] = "embeds"
    cases += [(bad_b64, 400, "video 0: invalid base64"), (bad_type, 400, "type 'embeds'")]
    for body, status, words in cases:
        got, out = server.post("/generate", body)
        assert got == status and words in out["message"], (words, got, out)
        assert generate_ids(server, video_body("<video>ok", clip, num_frames=2, n=2))  # still serving
    assert server.wait_metric("mmserver_kv_slots_used", 0) == 0
