"""A video's sampling options, checked against the server's caps and written as the stable
option key every process reads back (`video:nf8:mf768:mp90316800`): the part the families
share. A family appends what it alone reads (Qwen2-VL: the per-frame pixel range).

Sampling is `num_frames` (that many frames, the family's own rule for which) or `fps` (frames
per second of video, the family's rule for rounding and bounds), never both. The video's own
options (e.g. an OpenAI `video_url` object's keys) win over the request's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

from .errors import OptionError
from .family import VIDEO_PREFIX, VideoLimits
from .options import is_int

MAX_FPS = 120.0  # sampling faster than any clip plays is a typo, not a request


@dataclass(frozen=True)
class VideoSampling:
    num_frames: int | None  # explicit frame count, or
    fps: float | None  # sampling rate (exactly one of the two is set)
    max_frames: int  # the server's --max_video_frames
    max_pixels: int  # the server's --max_video_pixels (resized pixels over all sampled frames)
    frame_list: bool = False  # the source is frames already sampled (offline pipeline): use each once
    extra: str = ""  # the family's own part of the key

    @property
    def key(self) -> str:
        how = f"nf{self.num_frames}" if self.num_frames is not None else f"fps{self.fps!r}"
        key = f"{VIDEO_PREFIX}{how}:mf{self.max_frames}:mp{self.max_pixels}"
        key += ":list" if self.frame_list else ""
        return key + (f":{self.extra}" if self.extra else "")


def resolve(request: Mapping[str, Any], video: Mapping[str, Any], limits: VideoLimits, *,
            default_frames: int | None = None, default_fps: float | None = None,
            frame_list: bool = False) -> VideoSampling:
    """The sampling a video asks for (its own `num_frames` / `fps`, else the request's, else the
    family's default), checked: num_frames an integer in [1, max_frames], fps a number in (0, MAX_FPS]."""
    given = {k: video[k] for k in ("num_frames", "fps") if video.get(k) is not None}
    if not given:
        given = {k: request[k] for k in ("num_frames", "fps") if request.get(k) not in (None, -1)}
    if len(given) == 2:
        raise OptionError("num_frames", "and fps were both given; give one of them")
    num_frames, fps = given.get("num_frames"), given.get("fps")
    if num_frames is not None:
        if not is_int(num_frames) or not 1 <= num_frames <= limits.max_frames:
            raise OptionError("num_frames", f"must be an integer in [1, {limits.max_frames}] (the server's "
                                            f"--max_video_frames), got {num_frames!r}")
    elif fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) \
                or not 0 < fps <= MAX_FPS:
            raise OptionError("fps", f"must be a number in (0, {MAX_FPS:g}], got {fps!r}")
        fps = float(fps)
    elif default_frames is not None:
        num_frames = min(default_frames, limits.max_frames)
    else:
        fps = default_fps
    return VideoSampling(num_frames, fps, limits.max_frames, limits.max_pixels, frame_list)


def with_extra(sampling: VideoSampling, extra: str) -> VideoSampling:
    return replace(sampling, extra=extra)


def parse(key: str) -> VideoSampling:
    """The `VideoSampling` a key was written from (ValueError if it is not one)."""
    if not key.startswith(VIDEO_PREFIX):
        raise ValueError(f"not a video option key: {key!r}")
    fields = key[len(VIDEO_PREFIX):].split(":")
    how, mf, mp, rest = fields[0], fields[1], fields[2], fields[3:]
    frame_list = bool(rest) and rest[0] == "list"
    if frame_list:
        rest = rest[1:]
    num_frames = int(how[2:]) if how.startswith("nf") else None
    fps = float(how[3:]) if how.startswith("fps") else None
    if (num_frames is None) == (fps is None) or not mf.startswith("mf") or not mp.startswith("mp"):
        raise ValueError(f"not a video option key: {key!r}")
    return VideoSampling(num_frames, fps, int(mf[2:]), int(mp[2:]), frame_list, ":".join(rest))
