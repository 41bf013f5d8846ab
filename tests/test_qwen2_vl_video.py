"""Qwen2-VL / Qwen2.5-VL videos against transformers 5.23 (float32, CPU, tiny random checkpoints):
the patches (transformers' PIL image processor on each frame, frames paired by hand: the video
processor needs torchvision), qwen-vl-utils 0.0.10's frame count and per-frame size, the vision
tower on video grids, get_rope_index with videos (Qwen2.5-VL's fractional second_per_grid_ts
included), and greedy generation through `pipeline()` equal to `generate` with
pixel_values_videos on the SAME frames (decoded here at qwen_sampling's indices)."""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image
from mmserver import GenerationConfig, Video, pipeline
from mmserver.models.errors import MediaTooLarge, OptionError, PromptError, VideoError
from mmserver.models.family import ImagePlan, VideoLimits
from mmserver.models.qwen2_vl.preprocess import patchify, patchify_video
from mmserver.models.qwen2_vl.prompt import VIDEO, VISION
from mmserver.models.registry import load_family
from mmserver.models.video_io import VideoMeta, decode_frames, qwen_sampling

from hf_reference import hf_generate_with_logprobs
from video_util import make_clip

N_NEW = 8
MAX_PIXELS = 28 * 28 * 256  # the tiny checkpoints' server range: [3136, 200704]
IMAGE_PAD, VIDEO_PAD = 151655, 151656
# qwen-vl-utils 0.0.10 constants, clipped into the server range as the family does
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = min(768 * 28 * 28, MAX_PIXELS)
SMALL = 28 * 28 * 64  # a per-video max_pixels that keeps frames small (fast tests)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qdir(request, qwen_checkpoints):
    return qwen_checkpoints(request.param, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def family(qdir):
    return load_family(qdir)


@pytest.fixture(scope="module")
def pipe(qdir):
    return pipeline(qdir, device="cpu", dtype="float32", max_total_tokens=8192, max_req_len=4096)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_clip(n_frames=12, fps=6, width=64, height=48)


@lru_cache(maxsize=2)
def _hf(model_dir: str):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    return (AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


def _processor(min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def qwen_vl_utils_max(nframes: int, min_pixels: int, total: int, given_max: int | None = None) -> float:
    """qwen-vl-utils 0.0.10 fetch_video's per-frame max_pixels (VIDEO_MAX_PIXELS clipped to the server)."""
    cap = max(min(VIDEO_MAX_PIXELS, total / nframes * 2), int(min_pixels * 1.05))
    return cap if given_max is None else min(given_max, cap)


def hf_video(frames, min_pixels, max_pixels):
    """pixel_values_videos and [t, gh, gw] built independently of our code: the PIL image
    processor on each frame (padded to an even count by repeating the last, as qwen-vl-utils),
    the T = 0 half of each patch row, frames 2k and 2k+1 paired along T."""
    frames = list(frames) + [frames[-1]] * (len(frames) % 2)
    out = _processor(min_pixels, max_pixels)(images=frames, return_tensors="pt")
    grids = out["image_grid_thw"]
    assert all(g.tolist() == grids[0].tolist() for g in grids)
    _, gh, gw = grids[0].tolist()
    n, f = gh * gw, len(frames)
    half = out["pixel_values"].reshape(f, n, 3, 2, 14, 14)[:, :, :, 0]  # [F, N, C, P, P]
    paired = half.reshape(f // 2, 2, n, 3, 14, 14).permute(0, 2, 3, 1, 4, 5)  # [t, N, C, T, P, P]
    return paired.reshape(f // 2 * n, 3 * 2 * 14 * 14), [f // 2, gh, gw]


def hf_images(images):
    out = _processor(56 * 56, MAX_PIXELS)(images=list(images), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@torch.inference_mode()
def hf_generate(model_dir, content, images=(), videos=()):
    """transformers' greedy tokens, logprobs and prompt ids for one user turn; `videos`:
    (pixel_values_videos, grid, sample_fps) each, in prompt order, as are `images`."""
    model, tok = _hf(str(model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)
    kwargs = {}
    counts = {"<|image_pad|>": [], "<|video_pad|>": []}
    if images:
        pixel_values, grids = hf_images(images)
        kwargs.update(pixel_values=pixel_values, image_grid_thw=grids)
        counts["<|image_pad|>"] = [int(g.prod()) // 4 for g in grids]
    if videos:
        kwargs.update(pixel_values_videos=torch.cat([v[0] for v in videos]),
                      video_grid_thw=torch.tensor([v[1] for v in videos]))
        counts["<|video_pad|>"] = [int(np.prod(v[1])) // 4 for v in videos]
        if model.config.model_type == "qwen2_5_vl":  # the processor's: temporal_patch_size / fps, float32
            kwargs["second_per_grid_ts"] = torch.tensor([2 / v[2] for v in videos])
    pieces = re.split(r"(<\|image_pad\|>|<\|video_pad\|>)", text)
    nxt = {k: iter(v) for k, v in counts.items()}
    text = "".join(p * next(nxt[p]) if p in nxt else p for p in pieces)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    kwargs["mm_token_type_ids"] = (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()
    return hf_generate_with_logprobs(model, ids, N_NEW, **kwargs)


GEN = GenerationConfig(max_new_tokens=N_NEW, ignore_eos=True, logprobs=True)


def _check(got, expected):
    tokens, logprobs, ids = expected
    assert got.prompt_tokens == len(ids)
    assert got.token_ids == tokens
    np.testing.assert_allclose(got.logprobs, logprobs, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- patches and plans


def test_patchify_video_equals_the_image_processor(family, clip):
    c, v = family.config, family.config.vision
    frames = decode_frames(clip, [0, 3, 7, 11])
    ref, grid = hf_video(frames, 3136, SMALL)
    h, w = grid[1] * 14, grid[2] * 14
    resized = torch.stack([torch.from_numpy(np.array(f.resize((w, h), Image.Resampling.BICUBIC))) for f in frames])
    ours = patchify_video(resized, c.image_mean, c.image_std, v.patch_size, v.spatial_merge_size,
                          v.temporal_patch_size)
    assert ours.shape == ref.shape == (2 * grid[1] * grid[2], 1176)
    assert torch.equal(ours, ref)  # bit for bit
    # an image is a video of itself twice
    assert torch.equal(patchify(resized[1], c.image_mean, c.image_std),
                       patchify_video(resized[1:2].expand(2, -1, -1, -1), c.image_mean, c.image_std))
    with pytest.raises(ValueError, match="multiple of 2"):
        patchify_video(resized[:3], c.image_mean, c.image_std)


def test_plan_follows_qwen_vl_utils(family, clip):
    """12 frames at 6 fps: fps 2 → 4 frames at linspace(0, 11, 4).round(); the per-frame size
    from qwen-vl-utils' pixel rule, then smart_resize; the preprocessed frames match."""
    from mmserver.models.qwen2_vl.preprocess import smart_resize
    from mmserver.models import video_frames

    limits = VideoLimits()
    options = family.video_options({}, {}, limits)
    assert options == f"video:fps2.0:mf768:mp{limits.max_pixels}:px{VIDEO_MIN_PIXELS}-{MAX_PIXELS}"
    meta = video_frames.probe(clip)
    assert meta == VideoMeta(12, 6.0, 64, 48)
    q = qwen_sampling(12, 6.0)
    assert q.indices == [0, 4, 7, 11] and q.sample_fps == 2.0
    plan = family.plan_video(meta, options)
    h, w = smart_resize(48, 64, 28, VIDEO_MIN_PIXELS, qwen_vl_utils_max(4, VIDEO_MIN_PIXELS, limits.max_pixels))
    assert (h, w) == (280, 392)  # below VIDEO_MIN_PIXELS: scaled up
    assert plan.grid[:3] == (2, h // 14, w // 14) and plan.frames == 4 and plan.n_tokens == 2 * 20 * 28 // 4
    if family.config.kind == "qwen2_5_vl":
        assert plan.grid[3:] == (0, 2)  # tokens_per_second 2 × second_per_grid 1.0
    else:
        assert len(plan.grid) == 3
    x = family.preprocess_video(clip, options)
    assert x.pixels.dtype == torch.uint8 and x.pixels.shape == (4, h, w, 3)
    assert x.grid == plan.grid[:3] and x.n_tokens == plan.n_tokens
    frames = decode_frames(clip, q.indices)
    ref, grid = hf_video(frames, VIDEO_MIN_PIXELS, qwen_vl_utils_max(4, VIDEO_MIN_PIXELS, limits.max_pixels))
    assert grid == list(plan.grid[:3])
    assert torch.equal(family.preprocess_video(clip, options, normalize=True).pixels, ref)

    # num_frames, and the total-pixel rule: a 640×480 video, 6 frames, a budget that caps each frame
    small, big = VideoLimits(max_pixels=6 * 20000), VideoMeta(12, 6.0, 640, 480)
    plan = family.plan_video(big, family.video_options({}, {"num_frames": 6, "min_pixels": 3136}, small))
    cap = qwen_vl_utils_max(6, 3136, small.max_pixels)
    assert cap == 40000  # total / frames · 2
    h, w = smart_resize(480, 640, 28, 3136, cap)
    assert (h, w) == (168, 224) and plan.grid[:3] == (3, 12, 16) and plan.frames == 6
    # with the default minimum the 1.05·min floor (105369 per frame) overflows that budget: a 413
    with pytest.raises(MediaTooLarge, match="max_video_pixels"):
        family.plan_video(big, family.video_options({}, {"num_frames": 6}, small))
    # the video's own max_pixels narrows the cap (and the default minimum with it)
    options = family.video_options({"max_pixels": MAX_PIXELS}, {"max_pixels": SMALL}, limits)
    assert options.endswith(f":px{SMALL}-{SMALL}")
    h, w = smart_resize(48, 64, 28, SMALL, qwen_vl_utils_max(4, SMALL, limits.max_pixels, SMALL))
    assert family.plan_video(meta, options).grid[:3] == (2, h // 14, w // 14)


def test_frame_list_is_padded_to_even(family):
    """A frame list: every frame, RGBA composited on white, the last repeated to an even count."""
    frames = [random_image(64, 48, s) for s in range(5)]
    rgba = frames[2].convert("RGBA")
    rgba.putalpha(100)
    frames[2] = rgba
    options = family.video_options({}, {"max_pixels": SMALL}, VideoLimits(), frame_list=True)
    from mmserver.models import video_frames

    plan = family.plan_video(video_frames.frame_list_meta(frames, None), options)
    x = family.preprocess_video(frames, options, normalize=True)
    ref, grid = hf_video(frames, SMALL, SMALL)
    assert plan.frames == 6 and list(plan.grid[:3]) == grid == [3, grid[1], grid[2]]
    assert torch.equal(x.pixels, ref)
    compact = family.preprocess_video(frames, options)
    assert compact.pixels.shape[0] == 6 and torch.equal(compact.pixels[5], compact.pixels[4])


# --------------------------------------------------------------------------- tower and positions


def test_video_features_match_transformers(family, qdir, clip):
    """A video (3 temporal slices: attention and Qwen2.5-VL's windows per slice) packed with
    an image, against transformers' get_video_features."""
    model, _ = _hf(str(qdir))
    frames = decode_frames(clip, qwen_sampling(12, 6.0, num_frames=6).indices)
    pv, grid = hf_video(frames, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)  # 280×392: 10×14 merged, partial windows
    ref = model.model.get_video_features(pixel_values_videos=pv, video_grid_thw=torch.tensor([grid]),
                                         return_dict=True).pooler_output
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    encoder = family.build_encoder(family.load_weights(components=("vision",), progress=False))
    options = family.video_options({}, {"num_frames": 6}, VideoLimits())
    image = family.preprocess(random_image(100, 80, 1), family.image_options({}, {}))
    for normalize in (False, True):
        video = family.preprocess_video(clip, options, normalize=normalize)
        assert list(video.grid) == grid
        rows = encoder.encode_images([image, video])
        torch.testing.assert_close(rows[1], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.encode_images([video])[0], rows[1], atol=1e-5, rtol=0)


def _hf_rope(model, ids, plans, kinds, spg=None):
    t = torch.tensor([ids])
    types = (t == IMAGE_PAD).int() + 2 * (t == VIDEO_PAD).int()
    kw = {}
    img = [p.grid[:3] for p, k in zip(plans, kinds) if k == "image"]
    vid = [p.grid[:3] for p, k in zip(plans, kinds) if k == "video"]
    if img:
        kw["image_grid_thw"] = torch.tensor(img)
    if vid:
        kw["video_grid_thw"] = torch.tensor(vid)
        if spg is not None:
            kw["second_per_grid_ts"] = torch.tensor(spg)
    return model.model.get_rope_index(t, types, **kw)


@pytest.mark.parametrize("n_frames,video_fps,fps", [(84, 21.0, 7.0), (12, 6.0, 2.0), (40, 30.0, 2.0),
                                                    (600, 30.0, 2.0)])
def test_rope_index_matches_transformers(family, qdir, n_frames, video_fps, fps):
    """A video alone (Qwen2.5-VL: sampled at 7 fps → second_per_grid 2/7 s, or 3 fps (4 frames,
    the minimum, of 40 at 30 fps) → 2/3 s: fractional temporal steps), then image + video +
    image: positions and delta as get_rope_index. 40 frames of 600 (20 temporal patches, a 7×10
    merged grid): the temporal extent exceeds the spatial one, where 5.23's text-after-video
    rule (start + max(H, W)) differs from 4.x's (max position + 1)."""
    model, _ = _hf(str(qdir))
    vopt = family.video_options({}, {"fps": fps, "max_pixels": SMALL}, VideoLimits())
    vplan = family.plan_video(VideoMeta(n_frames, video_fps, 64, 48), vopt)
    q = qwen_sampling(n_frames, video_fps, fps=fps)
    t = vplan.grid[0]
    assert t == len(q.indices) // 2
    spg = [2 / q.sample_fps] if family.config.kind == "qwen2_5_vl" else None
    if spg:
        expected = (np.arange(t, dtype=np.float32) * (np.float32(2) * np.float32(spg[0]))).astype(np.int64)
        assert vplan.grid[3:] == tuple(expected)
    exp = family.expand_media("a b<video>c d", [], [vplan])
    assert exp.items == [("video", 0)]
    got = family.rope_inputs(exp.ids, exp.spans, [vplan.grid])
    ref, delta = _hf_rope(model, exp.ids, [vplan], ["video"], spg)
    assert torch.equal(got["rope_positions"], ref[:, 0]) and got["rope_delta"] == int(delta[0])

    iopt = family.image_options({}, {})
    plans = [family.plan_image(230, 150, iopt), vplan, family.plan_image(90, 300, iopt)]
    exp = family.expand_media(f"x{VISION}y <video> z{VISION}w", [plans[0], plans[2]], [vplan])
    assert exp.items == [("image", 0), ("video", 0), ("image", 1)]
    got = family.rope_inputs(exp.ids, exp.spans, [p.grid for p in plans])
    ref, delta = _hf_rope(model, exp.ids, plans, ["image", "video", "image"], spg)
    assert torch.equal(got["rope_positions"], ref[:, 0]) and got["rope_delta"] == int(delta[0])
    if family.config.kind == "qwen2_5_vl" and t > 1:
        with pytest.raises(PromptError, match="temporal offsets"):
            family.rope_inputs(exp.ids, exp.spans, [plans[0].grid, vplan.grid[:3], plans[2].grid])


def test_temporal_steps_are_float32(qwen_checkpoints):
    """84 frames already sampled at 20.5 fps: transformers multiplies in float32, which truncates
    temporal patch 41 of Qwen2.5-VL to 7 where float64 gives 8 (Qwen2-VL's step is always 1)."""
    qdir = qwen_checkpoints("qwen2_5_vl", max_pixels=MAX_PIXELS)
    family = load_family(qdir)
    model, _ = _hf(str(qdir))
    options = family.video_options({}, {"fps": 20.5, "max_pixels": SMALL}, VideoLimits(), frame_list=True)
    plan = family.plan_video(VideoMeta(84, 20.5, 64, 48), options)
    t = plan.grid[0]
    assert t == 42 and plan.grid[3 + 41] == 7 and int(41 * 2 * (2 / 20.5)) == 8
    exp = family.expand_media("<video>x", [], [plan])
    got = family.rope_inputs(exp.ids, exp.spans, [plan.grid])
    ref, delta = _hf_rope(model, exp.ids, [plan], ["video"], [2 / 20.5])
    assert torch.equal(got["rope_positions"], ref[:, 0]) and got["rope_delta"] == int(delta[0])


# --------------------------------------------------------------------------- prompts


def test_prompts_with_videos(family, qdir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qdir))
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "A"}, {"type": "image"},
                                         {"type": "video"}]}]
    assert family.render_chat(msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    url = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]
    assert VIDEO in family.render_chat(url)
    assert family.question_with_media("Describe.", 1, 2) == VIDEO * 2 + VISION + "Describe."
    assert family.question_with_media(f"{VIDEO} then {VISION}", 1, 1) == f"{VIDEO} then {VISION}"
    s = family.special
    exp = family.expand_media(f"<video>a{VISION}b{VIDEO}", [ImagePlan(4)], [ImagePlan(6), ImagePlan(8)])
    assert exp.items == [("video", 0), ("image", 0), ("video", 1)]
    assert [(n, set(exp.ids[a:a + n])) for a, n in exp.spans] == [(6, {s.video_pad}), (4, {s.image_pad}),
                                                                    (8, {s.video_pad})]
    for a, n in exp.spans:
        assert exp.ids[a - 1] == s.vision_start and exp.ids[a + n] == s.vision_end
    assert family.find_spans(exp.ids) == exp.spans
    with pytest.raises(PromptError, match="1 image placeholder.*2 video placeholder.*1 image.*1 video"):
        family.expand_media(f"<video>a{VISION}b{VIDEO}", [ImagePlan(4)], [ImagePlan(6)])
    with pytest.raises(PromptError, match="1 video placeholder"):
        family.expand_prompt("<video>hi", [])  # no longer "videos are not supported", just a miscount


# --------------------------------------------------------------------------- end to end


def test_clip_matches_transformers(pipe, qdir, clip):
    """mp4 bytes, default fps sampling: 4 frames, 2 temporal patches of 20×28 patches."""
    q = qwen_sampling(12, 6.0)
    frames = decode_frames(clip, q.indices)
    pv, grid = hf_video(frames, VIDEO_MIN_PIXELS, qwen_vl_utils_max(4, VIDEO_MIN_PIXELS, VideoLimits().max_pixels))
    assert grid == [2, 20, 28]
    expected = hf_generate(qdir, [{"type": "video"}, {"type": "text", "text": "What happens?"}],
                           videos=[(pv, grid, q.sample_fps)])
    _check(pipe(("What happens?", Video(clip)), GEN), expected)
    assert pipe.engine.kv.used == 0


def test_odd_frame_list_matches_transformers(pipe, qdir):
    """5 PIL frames (sampled at 2 fps): the last repeated → 6 frames, 3 temporal patches."""
    frames = [random_image(64, 48, 10 + s) for s in range(5)]
    pv, grid = hf_video(frames, SMALL, SMALL)
    assert grid[0] == 3
    expected = hf_generate(qdir, [{"type": "video"}, {"type": "text", "text": "Describe."}],
                           videos=[(pv, grid, 2.0)])
    _check(pipe(("Describe.", Video(frames, max_pixels=SMALL)), GEN), expected)


def test_image_and_video_in_one_prompt(pipe, qdir, clip):
    """A video (6 frames at 3 fps: Qwen2.5-VL's temporal step 1.33) and an image in one turn,
    as (text, [video, image]) and as a raw prompt with the image first."""
    q = qwen_sampling(12, 6.0, num_frames=6)
    assert q.sample_fps == 3.0
    frames = decode_frames(clip, q.indices)
    pv, grid = hf_video(frames, SMALL, SMALL)
    image = random_image(230, 150, 3)
    expected = hf_generate(qdir, [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Compare."}],
                           images=[image], videos=[(pv, grid, q.sample_fps)])
    video = Video(clip, num_frames=6, max_pixels=SMALL)
    _check(pipe(("Compare.", [video, image]), GEN), expected)

    prompt = pipe.family.render_chat([{"role": "user", "content": "<image>then<video>Compare."}])
    got = pipe.generate(prompt, images=[video, image], gen_config=GEN)  # kinds matched to placeholders in order
    expected = hf_generate(qdir, [{"type": "image"}, {"type": "text", "text": "then"}, {"type": "video"},
                                  {"type": "text", "text": "Compare."}], images=[image],
                           videos=[(pv, grid, q.sample_fps)])
    _check(got, expected)


# --------------------------------------------------------------------------- bad input


def test_bad_video_options(family, pipe, clip):
    lo, hi = family.min_pixels, family.max_pixels
    limits = VideoLimits()
    with pytest.raises(OptionError, match="num_frames"):
        family.video_options({}, {"num_frames": 4, "fps": 2.0}, limits)
    with pytest.raises(OptionError) as e:
        family.video_options({}, {"min_pixels": lo - 1}, limits)
    assert e.value.name == "min_pixels" and f"[{lo}, {hi}]" in e.value.detail
    with pytest.raises(OptionError) as e:
        family.video_options({"max_pixels": hi + 1}, {}, limits)
    assert e.value.name == "max_pixels"
    with pytest.raises(OptionError, match="empty range"):
        family.video_options({}, {"min_pixels": 9000, "max_pixels": 8000}, limits)
    meta = VideoMeta(12, 6.0, 64, 48)
    tight = family.video_options({}, {}, VideoLimits(max_pixels=100_000))  # 2 × 109760 pixels needed
    with pytest.raises(MediaTooLarge, match="video 0: .*max_video_pixels"):
        family.plan_video(meta, tight)
    with pytest.raises(MediaTooLarge, match="video 3"):
        family.preprocess_video(clip, tight, index=3)
    few = family.video_options({}, {}, VideoLimits(max_frames=3))
    assert family.plan_video(meta, few).frames == 2  # smart_nframes: the cap floor2(3) wins over the minimum 4
    with pytest.raises(VideoError, match="cannot sample"):
        family.plan_video(meta, family.video_options({}, {"num_frames": 1}, limits))  # rounds to 0
    with pytest.raises(OptionError, match="num_frames"):
        pipe.prepare("<video>hi", [Video(clip, num_frames=4, fps=2)])
    with pytest.raises(OptionError, match="min_pixels"):
        pipe.prepare("<video>hi", [Video(clip, min_pixels=hi + 1)])
    pipe.video_limits = VideoLimits(max_pixels=100_000)
    try:
        with pytest.raises(MediaTooLarge):
            pipe.prepare("<video>hi", [Video(clip)])
    finally:
        pipe.video_limits = VideoLimits()
    assert pipe.engine.kv.used == 0
