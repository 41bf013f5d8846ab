"""InternVL videos through `pipeline()`: a video is exactly its sampled frames sent as images
under `Frame{i}: <image>\\n` with a 1-tile cap, and equals transformers on those frames."""

from __future__ import annotations

import base64

import pytest

from mmserver import GenerationConfig, Video
from mmserver.pipeline import ImageInput
from mmserver.models.errors import OptionError, VideoError
from mmserver.models.internvl.prompt import frames_prompt
from mmserver.models.video_io import decode_frames, internvl_indices

from hf_reference import hf_greedy, hf_inputs
from video_util import encoder_for, make_clip

N_NEW = 8
GREEDY = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, ignore_eos=True)
ONE_TILE = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, ignore_eos=True, image_max_patch_num=1)
QUESTION = "What happens in the clip?"


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_clip(n_frames=12, fps=6, width=64, height=48)


def _frames(clip: bytes, n: int):
    return decode_frames(clip, internvl_indices(12, n))


def test_video_is_its_frames_as_one_tile_images(pipe, clip):
    frames = _frames(clip, 4)
    as_images = pipe.generate(frames_prompt(4) + QUESTION, images=frames, gen_config=ONE_TILE)
    got = pipe.generate("<video>" + QUESTION, images=[Video(clip, num_frames=4)], gen_config=GREEDY)
    assert got.token_ids == as_images.token_ids
    assert got.prompt_tokens == as_images.prompt_tokens == len(pipe.prepare(frames_prompt(4) + QUESTION, frames, 1)[0])
    ids, pixels = pipe.prepare("<video>" + QUESTION, [Video(clip, num_frames=4)])
    assert ids == pipe.prepare(frames_prompt(4) + QUESTION, frames, 1)[0]
    assert pixels[0].shape == (4, 3, 448, 448)  # one tile per frame, no thumbnail
    assert pipe.engine.kv.used == 0


def test_video_matches_transformers_on_the_same_frames(pipe, checkpoints, clip):
    frames = _frames(clip, 4)
    prompt = frames_prompt(4) + QUESTION
    hf_ids, pixel_values = hf_inputs(checkpoints("hf", "qwen2"), prompt, frames, max_patches=1)
    expected = hf_greedy(checkpoints("hf", "qwen2"), hf_ids, pixel_values, N_NEW)
    got = pipe.generate("<video>" + QUESTION, images=[Video(clip, num_frames=4)], gen_config=GREEDY)
    assert got.token_ids == expected
    assert got.prompt_tokens == len(hf_ids)


def test_default_is_eight_segment_middles(pipe, clip):
    ids, pixels = pipe.prepare("<video>hi", [Video(clip)])
    assert pixels[0].shape[0] == 8
    assert ids.count(pipe.family.special.img_context) == 8 * 256
    assert internvl_indices(12, 8) == [0, 1, 3, 4, 6, 7, 8, 10]  # load_video's get_index: seg 11/8, np.round


def test_chat_forms_agree(pipe, clip):
    """(text, Video), OpenAI video_url parts (data URL) and a frame list all give the same answer
    as the frames placed by hand."""
    frames = _frames(clip, 4)
    by_hand = pipe((frames_prompt(4) + QUESTION, frames), gen_config=ONE_TILE)
    as_tuple = pipe((QUESTION, Video(clip, num_frames=4)), gen_config=GREEDY)
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    as_openai = pipe([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, "num_frames": 4}},
                                                   {"type": "text", "text": QUESTION}]}], gen_config=GREEDY)
    as_frames = pipe((QUESTION, Video(frames)), gen_config=GREEDY)
    assert as_tuple.token_ids == as_openai.token_ids == as_frames.token_ids == by_hand.token_ids


def test_video_and_image_in_one_prompt(pipe, clip, image_factory):
    """The image keeps the request's tile cap; the video's frames get one tile each (an image's
    own max_dynamic_patch gives the same by hand)."""
    frames = _frames(clip, 2)
    img = image_factory(300, 200, 7)
    mixed = pipe.generate("<image>\n<video>Compare.", images=[Video(clip, num_frames=2), img], gen_config=GREEDY)
    by_hand = pipe.generate("<image>\n" + frames_prompt(2) + "Compare.",
                            images=[img, *(ImageInput(f, {"max_dynamic_patch": 1}) for f in frames)],
                            gen_config=GREEDY)
    assert mixed.token_ids == by_hand.token_ids and mixed.prompt_tokens == by_hand.prompt_tokens
    assert pipe.prepare("<image>\nhi", [img])[1][0].shape[0] > 1  # the image itself has several tiles


def test_path_and_url_sources(pipe, clip, tmp_path):
    import torch

    from server_util import serve_directory

    (tmp_path / "clip.mp4").write_bytes(clip)
    want = pipe.prepare("<video>hi", [Video(clip, num_frames=3)])[1][0]

    def pixels(source):
        return pipe.prepare("<video>hi", [Video(source, num_frames=3)])[1][0]

    assert torch.equal(pixels(tmp_path / "clip.mp4"), want)
    assert torch.equal(pixels(str(tmp_path / "clip.mp4")), want)
    with serve_directory(tmp_path) as base:
        assert torch.equal(pixels(f"{base}/clip.mp4"), want)
    assert not torch.equal(pixels(make_clip(n_frames=12, fps=6, seed=1)), want)  # other content, other pixels
    with pytest.raises(VideoError, match="video 0"):
        pixels(tmp_path / "missing.mp4")


@pytest.mark.parametrize("fmt", ["gif", "mov", "webm"])
def test_other_containers(pipe, fmt):
    if encoder_for(fmt) is None:
        pytest.skip(f"this PyAV wheel has no {fmt} encoder")
    data = make_clip(n_frames=6, fps=3, fmt=fmt)
    ids, pixels = pipe.prepare("<video>hi", [Video(data, num_frames=3)])
    assert pixels[0].shape[0] == 3


def test_request_level_sampling(pipe, clip):
    """GenerationConfig(num_frames=…) samples every video that sets none; a video's own wins."""
    cfg = GenerationConfig(max_new_tokens=N_NEW, ignore_eos=True, num_frames=4)
    got = pipe.generate("<video>" + QUESTION, images=[Video(clip)], gen_config=cfg)
    assert got.token_ids == pipe.generate("<video>" + QUESTION, images=[Video(clip, num_frames=4)],
                                          gen_config=GREEDY).token_ids
    own = pipe.generate("<video>" + QUESTION, images=[Video(clip, num_frames=2)], gen_config=cfg)
    assert own.prompt_tokens == len(pipe.prepare("<video>" + QUESTION, [Video(clip, num_frames=2)])[0])
    assert own.prompt_tokens < got.prompt_tokens - 2 * 256
    with pytest.raises(OptionError, match="num_frames"):
        pipe.generate("<video>hi", images=[Video(clip)], gen_config=GenerationConfig(num_frames=2, fps=1.0))


def test_fps_sampling(pipe, clip):
    # 12 frames at 6 fps = 2 s; 1.5 fps → 3 segments
    _, pixels = pipe.prepare("<video>hi", [Video(clip, fps=1.5)])
    assert pixels[0].shape[0] == 3


def test_bad_videos(pipe, clip):
    with pytest.raises(VideoError, match="video 0"):
        pipe.prepare("<video>hi", [Video(b"not a video at all" * 10)])
    with pytest.raises(VideoError, match="video 0"):
        pipe.prepare("<video>hi", [Video(clip[:len(clip) // 2])])
    with pytest.raises(OptionError, match="num_frames"):
        pipe.prepare("<video>hi", [Video(clip, num_frames=4, fps=2)])
    with pytest.raises(OptionError, match="num_frames"):
        pipe.prepare("<video>hi", [Video(clip, num_frames=0)])
    with pytest.raises(ValueError, match="video placeholder"):
        pipe.prepare("hi", [Video(clip)])
    assert pipe.engine.kv.used == 0
