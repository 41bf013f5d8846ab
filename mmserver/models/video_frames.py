"""A video source (file bytes, a path, or frames already sampled) → the frames a family's
sampling rule picks, decoded by `video_io` (PyAV). Shared by every family that takes videos;
which frames to pick is the family's."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from PIL import Image

from .errors import MediaTooLarge, VideoError
from .family import VideoSource
from .video_options import VideoSampling

Pick = Callable[["VideoMeta"], list[int]]  # noqa: F821 — video_io.VideoMeta, imported lazily (PyAV)


def is_frame_list(source: VideoSource) -> bool:
    return isinstance(source, (list, tuple)) and all(isinstance(f, Image.Image) for f in source)


def video_bytes(source: VideoSource, index: int = 0) -> bytes:
    """The file bytes of a video given as bytes or a path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return f.read()
        except OSError as e:
            raise VideoError(index, f"cannot read {str(source)[:200]!r} ({e.strerror or e})") from None
    raise VideoError(index, f"a video must be file bytes, a path or a list of PIL frames, got {type(source).__name__}")


def frame_list_meta(frames: Sequence[Image.Image], fps: float | None, index: int = 0):
    """The header of frames given as a list (their count and size; `fps`, the rate they were
    sampled at, if known, else 2)."""
    from .video_io import VideoMeta

    if not frames:
        raise VideoError(index, "the video has no frames")
    return VideoMeta(len(frames), float(fps or 2.0), frames[0].width, frames[0].height)


def probe(source: VideoSource, index: int = 0):
    """The header of a video source (no frame decoded for files)."""
    from .video_io import probe as probe_bytes

    if is_frame_list(source):
        return frame_list_meta(source, None, index)
    return probe_bytes(video_bytes(source, index), index)


def sampled_frames(source: VideoSource, sampling: VideoSampling, pick: Pick, index: int = 0) -> list[Image.Image]:
    """RGB frames in order: a frame list as it is (each frame once), else the frames `pick`
    chooses from the file's header, decoded (only those)."""
    if is_frame_list(source):
        frames = [f.convert("RGB") for f in source]
        if not frames:
            raise VideoError(index, "the video has no frames")
        if len(frames) > sampling.max_frames:
            raise MediaTooLarge(index, f"{len(frames)} frames exceed the server's {sampling.max_frames} "
                                       "(--max_video_frames)", kind="video")
        return frames
    from .video_io import decode_frames, probe as probe_bytes

    data = video_bytes(source, index)
    indices = pick(probe_bytes(data, index))
    return decode_frames(data, indices, index)


def check_budget(frames: int, pixels_per_frame: int, sampling: VideoSampling, index: int = 0) -> None:
    """Refuse a sampled video over the server's frame or pixel caps (a 413)."""
    if frames > sampling.max_frames:
        raise MediaTooLarge(index, f"{frames} sampled frames exceed the server's {sampling.max_frames} "
                                   "(--max_video_frames)", kind="video")
    if frames * pixels_per_frame > sampling.max_pixels:
        raise MediaTooLarge(index, f"{frames} frames × {pixels_per_frame} pixels = {frames * pixels_per_frame} "
                                   f"exceed the server's {sampling.max_pixels}-pixel budget per video "
                                   "(--max_video_pixels)", kind="video")
