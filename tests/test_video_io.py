"""mmserver.models.video_io: probing and decoding videos with PyAV, and the frame samplers."""

from __future__ import annotations

import functools
import io
import math
import random

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mmserver.models import video_io
from mmserver.models.errors import MediaTooLarge, VideoError
from mmserver.models.video_io import (QwenSampling, VideoMeta, decode_frames, internvl_indices, probe,
                                      qwen_sampling)
from video_util import encoder_for, frame_number, make_clip

FORMATS = ["mp4", "mov", "webm", "gif"]


def _need(fmt: str) -> None:
    if encoder_for(fmt) is None:
        pytest.skip(f"this PyAV wheel has no encoder for {fmt}")


@functools.lru_cache(maxsize=None)
def clip(fmt: str = "mp4", n_frames: int = 30, fps: int = 10, gop_size: int | None = 4, **kw) -> bytes:
    """Clips are cached: encoding is the slow part of these tests."""
    _need(fmt)
    return make_clip(n_frames, fps, fmt=fmt, gop_size=gop_size, **kw)


def naive_decode(data: bytes) -> list[np.ndarray]:
    """Every frame, decoded from the start with no seeking: the reference for decode_frames."""
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


# --- probe ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_probe_counts_frames_rate_and_size(fmt):
    _need(fmt)
    fps = 10 if fmt == "gif" else 6  # a GIF's delay is in 1/100 s: 6 fps is not representable
    meta = probe(make_clip(12, fps, width=80, height=48, fmt=fmt))
    assert meta == VideoMeta(n_frames=12, fps=float(fps), width=80, height=48)


def test_probe_counts_packets_where_the_stream_header_has_no_count():
    data = clip("webm")
    with av.open(io.BytesIO(data)) as c:
        assert c.streams.video[0].frames == 0  # Matroska does not store a frame count
    assert probe(data).n_frames == 30


def test_probe_accepts_a_still_image_as_one_frame():
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (10, 200, 30)).save(buf, "PNG")
    meta = probe(buf.getvalue())
    assert (meta.n_frames, meta.width, meta.height) == (1, 20, 10) and meta.fps > 0
    [img] = decode_frames(buf.getvalue(), [0])
    assert img.mode == "RGB" and img.size == (20, 10)
    assert img.getpixel((5, 5)) == (10, 200, 30)


def test_probe_frames_over_the_pixel_limit_are_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 - 1)
    with pytest.raises(MediaTooLarge) as e:
        probe(clip("mp4"), index=2)
    assert str(e.value).startswith("video 2:") and "64x48" in str(e.value)


# --- decode_frames -------------------------------------------------------------------------

INDEX_SETS = {
    "first": [0],
    "last": [29],
    "sparse": [2, 11, 17, 26],  # each past the next keyframe of a GOP-4 clip: seeks
    "dense": list(range(30)),
    "repeated": [0, 0, 5, 5, 5, 29, 29],
    "within-one-gop": [9, 10, 11],
    "keyframes": [0, 4, 8, 28],
    "unsorted": [21, 3, 14],
}


@pytest.mark.parametrize("gop", [4, None], ids=["gop4", "single-gop"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", list(INDEX_SETS))
def test_decode_returns_the_wanted_frames(fmt, gop, which):
    indices = INDEX_SETS[which]
    frames = decode_frames(clip(fmt, gop_size=gop), indices)
    assert [frame_number(f) for f in frames] == indices
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)


@pytest.mark.parametrize("gop", [4, 1, None], ids=["gop4", "intra", "single-gop"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_equals_a_full_linear_decode(fmt, gop):
    data = clip(fmt, gop_size=gop)
    ref = naive_decode(data)
    assert len(ref) == 30
    for indices in ([1, 6, 13, 22, 29], [0, 3, 4, 5, 27, 28, 29], list(range(30))):
        got = decode_frames(data, indices)
        for i, img in zip(indices, got):
            np.testing.assert_array_equal(np.asarray(img), ref[i], err_msg=f"{fmt} frame {i}")


def test_decode_mpeg4_codec():
    data = clip("mp4", codec="mpeg4")
    assert [frame_number(f) for f in decode_frames(data, [0, 7, 22, 29])] == [0, 7, 22, 29]


def test_repeated_index_gives_equal_but_separate_images():
    a, b = decode_frames(clip("mp4"), [7, 7])
    assert a is not b and a.tobytes() == b.tobytes()


class _CountingContainer:
    """An InputContainer that counts seeks and decoded frames (PyAV's classes are not patchable)."""

    def __init__(self, inner, log):
        self._inner, self._log = inner, log

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def seek(self, *a, **kw):
        self._log["seeks"] += 1
        return self._inner.seek(*a, **kw)

    def decode(self, *a, **kw):
        for frame in self._inner.decode(*a, **kw):
            self._log["decoded"] += 1
            yield frame


@pytest.mark.parametrize("fmt", ["mp4", "mov", "webm"])
def test_decode_seeks_past_frames_it_does_not_need(fmt, monkeypatch):
    data = clip(fmt, gop_size=4)  # keyframes 0, 4, ..., 28
    log = {"seeks": 0, "decoded": 0}
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **kw: _CountingContainer(real_open(*a, **kw), log))
    runs = []
    real_by_pts = video_io._decode_by_pts
    monkeypatch.setattr(video_io, "_decode_by_pts", lambda *a, seek: runs.append(seek) or real_by_pts(*a, seek=seek))
    frames = decode_frames(data, [1, 25])
    assert [frame_number(f) for f in frames] == [1, 25]
    assert runs == [True]  # one seeking run, no fallback to a decode from the start
    assert log["seeks"] == 1  # to keyframe 24
    assert log["decoded"] < 10  # frames 0-1 and 24-25 (plus what the decoder emits early), not 26


def test_decode_does_not_seek_within_a_gop(monkeypatch):
    data = clip("mp4", gop_size=None)
    log = {"seeks": 0, "decoded": 0}
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **kw: _CountingContainer(real_open(*a, **kw), log))
    assert [frame_number(f) for f in decode_frames(data, [3, 20])] == [3, 20]
    assert log["seeks"] == 0


@pytest.mark.parametrize("fmt", ["mp4", "webm", "gif"])
def test_linear_fallback_gives_the_same_frames(fmt, monkeypatch):
    data = clip(fmt)
    want = [0, 2, 2, 17, 29]
    seeking = decode_frames(data, want)
    monkeypatch.setattr(video_io, "_decode_by_pts", lambda *a, **kw: None)  # as for a clip without pts
    linear = decode_frames(data, want)
    assert [frame_number(f) for f in linear] == want
    assert [f.tobytes() for f in linear] == [f.tobytes() for f in seeking]


def test_empty_indices():
    assert decode_frames(clip("mp4"), []) == []


@pytest.mark.parametrize("bad", [-1, 30, 31, 1000])
def test_out_of_range_index(bad):
    with pytest.raises(VideoError) as e:
        decode_frames(clip("mp4"), [0, bad], index=4)
    assert str(e.value).startswith("video 4:") and "out of range" in str(e.value) and "30 frames" in str(e.value)


def test_non_integer_index():
    with pytest.raises(VideoError):
        decode_frames(clip("mp4"), [1.5])


# --- bad input -----------------------------------------------------------------------------

NOT_VIDEOS = {
    "empty": b"",
    "text": b"this is a plain text file, not a video\n" * 20,
    "random": random.Random(1).randbytes(4096),
    "zeros": bytes(4096),
    "html": b"<!doctype html><html><body>" + b"<p>hi</p>" * 100 + b"</body></html>",
}


@pytest.mark.parametrize("name", list(NOT_VIDEOS))
def test_not_a_video(name):
    data = NOT_VIDEOS[name]
    for call in (lambda: probe(data, index=3), lambda: decode_frames(data, [0], index=3)):
        with pytest.raises(VideoError) as e:
            call()
        assert str(e.value).startswith("video 3:")
        assert type(e.value.__cause__) is not VideoError  # a chained av error is fine; not raised


def test_not_bytes():
    with pytest.raises(VideoError, match="video 0: expected encoded video bytes"):
        probe("clip.mp4")


def test_audio_only_has_no_video_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        s = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            out.mux(p)
        for p in s.encode():
            out.mux(p)
    with pytest.raises(VideoError, match="video 1: no video stream"):
        probe(buf.getvalue(), index=1)


def _raises_video_error(data: bytes, index: int = 5) -> VideoError:
    """probe then decode every frame: one of the two must raise VideoError, nothing else."""
    with pytest.raises(VideoError) as e:
        meta = probe(data, index=index)
        decode_frames(data, list(range(meta.n_frames)), index=index)
    assert str(e.value).startswith(f"video {index}:")
    return e.value


@pytest.mark.parametrize("fmt", ["mp4", "mov"])
def test_truncated_clip(fmt):
    data = clip(fmt)
    _raises_video_error(data[: len(data) // 2])  # the index (at the end) is gone: cannot open


@pytest.mark.parametrize("keep", [2 / 3, -1], ids=["two-thirds", "all-but-one-byte"])
def test_truncated_faststart_clip_fails_when_decoding(keep):
    # The index up front lists 30 frames; the data of the last ones is cut. Those frames cannot
    # be decoded, and decode_frames says so instead of returning fewer frames.
    data = clip("mp4", faststart=True)
    cut = data[:keep] if keep == -1 else data[: int(len(data) * keep)]
    meta = probe(cut)
    assert 0 < meta.n_frames <= 30
    err = _raises_video_error(cut)
    assert "truncated" in str(err) and f"of its {meta.n_frames} frames" in str(err)
    # The frames before the cut still decode.
    assert [frame_number(f) for f in decode_frames(cut, [0, 1])] == [0, 1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupted_bytes_never_raise_anything_but_video_error(fmt):
    base = clip(fmt, n_frames=12)
    rng = random.Random(7)
    for _ in range(25):
        data = bytearray(base)
        for _ in range(rng.choice([1, 8, 64])):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            meta = probe(bytes(data), index=1)
            frames = decode_frames(bytes(data), list(range(meta.n_frames)), index=1)
        except VideoError as e:
            assert str(e).startswith("video 1:")
        else:
            assert len(frames) == meta.n_frames


# --- internvl_indices ----------------------------------------------------------------------


def internvl_reference(n_frames: int, num_segments: int, fps: float = 30.0) -> list[int]:
    """InternVL's README get_index(bound=None, fps, max_frame, first_idx=0, num_segments)."""
    bound, first_idx, max_frame = None, 0, n_frames - 1
    start, end = (bound[0], bound[1]) if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


@pytest.mark.parametrize("n_frames,segments", [(12, 8), (30, 8), (100, 8), (300, 32), (1000, 7), (16, 16),
                                               (5, 8), (2, 8), (1, 4), (9, 1), (1301, 64)])
def test_internvl_indices_match_the_reference(n_frames, segments):
    got = internvl_indices(n_frames, segments)
    assert got == internvl_reference(n_frames, segments)
    assert len(got) == segments and all(0 <= i < n_frames for i in got) and got == sorted(got)
    assert all(type(i) is int for i in got)


def test_internvl_indices_round_half_to_even():
    # seg_size 2.5: np.round(2.5) == 2 and np.round(7.5) == 8 (Python's round agrees; a
    # floor(x + 0.5) would not): [int(1.25 + 0), int(1.25 + 2), int(1.25 + 5), int(1.25 + 8)]
    assert internvl_indices(11, 4) == [1, 3, 6, 9]


def test_internvl_indices_bad_arguments():
    with pytest.raises(ValueError):
        internvl_indices(10, 0)
    with pytest.raises(VideoError):
        internvl_indices(0, 8)


# --- qwen_sampling -------------------------------------------------------------------------


def qwen_reference(total_frames, video_fps, fps=2.0, nframes=None, min_frames=4, max_frames=None):
    """qwen-vl-utils 0.0.10 smart_nframes + the frame indices of its video readers."""
    FRAME_FACTOR, FPS_MAX_FRAMES = 2, 768
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        min_f = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        max_f = math.floor((max_frames if max_frames is not None else min(FPS_MAX_FRAMES, total_frames))
                           / FRAME_FACTOR) * FRAME_FACTOR
        n = total_frames / video_fps * fps
        n = min(min(max(n, min_f), max_f), total_frames)
        n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not (FRAME_FACTOR <= n and n <= total_frames):
        raise ValueError(f"nframes should in interval [{FRAME_FACTOR}, {total_frames}], but got {n}.")
    idx = torch.linspace(0, total_frames - 1, n).round().long().tolist()
    return idx, n / max(total_frames, 1e-6) * video_fps


def test_qwen_short_clip_gets_min_frames():
    s = qwen_sampling(12, 6.0)  # 2 s at 2 fps = 4 frames
    assert s == QwenSampling(indices=[0, 4, 7, 11], sample_fps=2.0)
    assert (s.indices, s.sample_fps) == qwen_reference(12, 6.0)


def test_qwen_long_clip_hits_max_frames():
    s = qwen_sampling(30_000, 25.0)  # 20 minutes at 2 fps = 2400 frames, capped at 768
    assert len(s.indices) == 768
    assert s.indices[0] == 0 and s.indices[-1] == 29_999
    assert (s.indices, s.sample_fps) == qwen_reference(30_000, 25.0)
    assert s.sample_fps == pytest.approx(768 / 30_000 * 25.0)
    assert len(qwen_sampling(30_000, 25.0, max_frames=101).indices) == 100  # floored to the factor


@pytest.mark.parametrize("num_frames,expect", [(5, 4), (7, 8), (4, 4), (3, 4), (1, 0), (2, 2), (9, 8), (11, 12)])
def test_qwen_explicit_num_frames_round_to_the_factor(num_frames, expect):
    # round(2.5) == 2 -> 4; round(3.5) == 4 -> 8: Python rounds half to even.
    if expect < 2:
        with pytest.raises(VideoError):
            qwen_sampling(40, 10.0, num_frames=num_frames)
        return
    s = qwen_sampling(40, 10.0, num_frames=num_frames)
    assert len(s.indices) == expect
    assert (s.indices, s.sample_fps) == qwen_reference(40, 10.0, nframes=num_frames)


@pytest.mark.parametrize("n_frames,video_fps,fps,min_frames,max_frames", [
    (12, 6.0, 2.0, 4, 768), (100, 30.0, 2.0, 4, 768), (7, 30.0, 2.0, 4, 768), (9, 3.0, 2.0, 4, 768),
    (1000, 29.97, 1.0, 4, 768), (1000, 29.97, 0.5, 3, 768), (5000, 60.0, 4.0, 4, 64), (61, 24.0, 2.0, 8, 768),
])
def test_qwen_matches_the_reference(n_frames, video_fps, fps, min_frames, max_frames):
    s = qwen_sampling(n_frames, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
    assert (s.indices, s.sample_fps) == qwen_reference(n_frames, video_fps, fps, min_frames=min_frames,
                                                       max_frames=min(max_frames, n_frames))
    assert len(s.indices) % 2 == 0 and all(0 <= i < n_frames for i in s.indices)


def test_qwen_one_frame_is_too_few():
    with pytest.raises(VideoError) as e:
        qwen_sampling(1, 30.0)
    assert str(e.value).startswith("video 0:") and "1 frames" in str(e.value)
    with pytest.raises(VideoError, match="video 2:"):
        qwen_sampling(1, 30.0, index=2)


def test_qwen_explicit_num_frames_above_the_clip_length():
    with pytest.raises(VideoError, match="12 frames"):
        qwen_sampling(12, 6.0, num_frames=14)
