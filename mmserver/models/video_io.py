"""Decoding videos from memory with PyAV, and the frame-sampling rules of the model families.

`probe` reads a video's frame count, frame rate and size without decoding a frame;
`decode_frames` decodes only the frames a sampler picked (seeking between keyframes instead of
decoding the whole clip); `internvl_indices` and `qwen_sampling` are the reference samplers of
InternVL and qwen-vl-utils. Every bad input is a VideoError ("video {index}: ..."), never a raw
PyAV exception, so request handlers can answer it with a 400.
"""

from __future__ import annotations

import bisect
import io
import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import av
import av.error
import numpy as np
from PIL import Image

from .errors import ImageError, MediaTooLarge, VideoError

__all__ = ["VideoMeta", "probe", "decode_frames", "internvl_indices", "QwenSampling", "qwen_sampling"]


@dataclass(frozen=True)
class VideoMeta:
    n_frames: int  # frames in presentation order, counted by demuxing (stream.frames is often 0 or wrong)
    fps: float  # average frame rate, > 0
    width: int
    height: int


class _Packet(NamedTuple):
    pts: int | None
    dts: int | None
    key: bool


# --- opening and demuxing -------------------------------------------------------------------


@contextmanager
def _av_errors(index: int, what: str) -> Iterator[None]:
    """Map whatever PyAV/FFmpeg raises while `what` to a VideoError naming the cause."""
    try:
        yield
    except ImageError:  # VideoError, MediaTooLarge: already worded
        raise
    except av.error.FFmpegError as e:
        # strerror alone: str(e) appends the errno and a meaningless "'<none>'" file name.
        raise VideoError(index, f"cannot {what}: {getattr(e, 'strerror', None) or e}") from e
    except Exception as e:  # PyAV also raises plain ValueError/OSError/... on odd input
        raise VideoError(index, f"cannot {what}: {type(e).__name__}: {e}") from e


_ATTACHED_PIC = 0x400  # AV_DISPOSITION_ATTACHED_PIC (av.stream.Disposition, PyAV >= 13)


def _is_cover_art(stream: av.video.stream.VideoStream) -> bool:
    try:
        return bool(int(stream.disposition) & _ATTACHED_PIC)
    except (AttributeError, TypeError, ValueError):  # an older PyAV without dispositions
        return False


@contextmanager
def _open(data: bytes, index: int) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """The container (from memory) and its first real video stream, closed on exit."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise VideoError(index, f"expected encoded video bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise VideoError(index, "cannot decode bytes as a video (empty data)")
    with _av_errors(index, "open the data as a video"):
        container = av.open(io.BytesIO(bytes(data)), mode="r")
    try:
        with _av_errors(index, "read the video's streams"):
            # Skip cover art: an audio file's attached picture is a 1-frame "video" stream.
            streams = [s for s in container.streams.video if not _is_cover_art(s)]
            if not streams:
                raise VideoError(index, f"no video stream in the data (container {container.format.name!r})")
            stream = streams[0]
            if stream.codec_context is None:
                raise VideoError(index, "no decoder for the video's codec in this build")
            # Frame + slice threads: decoding a long clip on one core is the slow path.
            stream.thread_type = "AUTO"
        yield container, stream
    finally:
        try:
            container.close()
        except Exception:
            pass  # closing a half-read container must not mask the real error


def _scan(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
          index: int) -> list[_Packet]:
    """The stream's packets in decode order (no decoding): one packet is one frame."""
    packets = []
    with _av_errors(index, "read the video (truncated or corrupt?)"):
        for p in container.demux(stream):
            # size 0: the end-of-stream flush packets; discard: frames an edit list drops.
            if p.size > 0 and not getattr(p, "is_discard", False):  # PyAV >= 12
                packets.append(_Packet(p.pts, p.dts, bool(p.is_keyframe)))
    return packets


def _fps(stream: av.video.stream.VideoStream, container: av.container.InputContainer, n_frames: int) -> float:
    """The average frame rate; the container's duration only when the stream states no rate."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and rate > 0:
            return float(rate)
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        seconds = 0.0
    return n_frames / seconds if seconds > 0 else 0.0


def _inspect(data: bytes, index: int) -> tuple[VideoMeta, list[_Packet]]:
    with _open(data, index) as (container, stream):
        packets = _scan(container, stream, index)
        cc = stream.codec_context
        width, height = cc.width, cc.height
        fps = _fps(stream, container, len(packets))
    if not packets:
        raise VideoError(index, "the video has no frames")
    if width <= 0 or height <= 0:
        raise VideoError(index, f"the video has zero size ({width}x{height})")
    limit = Image.MAX_IMAGE_PIXELS  # each frame becomes a PIL image: PIL's bomb limit applies
    if limit and width * height > limit:
        raise MediaTooLarge(index, f"video frames are too large ({width}x{height} = {width * height} "
                            f"pixels, limit {limit})", kind="video")
    if not (fps > 0 and math.isfinite(fps)):
        raise VideoError(index, "the video has no usable frame rate")
    return VideoMeta(len(packets), fps, width, height), packets


def probe(data: bytes, index: int = 0) -> VideoMeta:
    """Frame count, frame rate and size of an encoded video, without decoding a frame.

    Raises VideoError for data that is not a video, has no video stream, no frames or a zero
    size; MediaTooLarge for frames over PIL's pixel limit.
    """
    return _inspect(data, index)[0]


# --- decoding --------------------------------------------------------------------------------


def decode_frames(data: bytes, indices: Sequence[int], index: int = 0) -> list[Image.Image]:
    """The RGB frames at `indices` (0-based presentation-order frame numbers, repeats allowed),
    in the order of `indices`.

    Only the wanted frames are converted to images; in between, the decoder runs only as far
    as the codec needs: a wanted frame past the next keyframe is reached by seeking to that
    keyframe. Raises VideoError for a bad video, an index out of range, or a video that ends
    (truncated, corrupt) before every wanted frame was decoded.
    """
    try:
        indices = [operator.index(i) for i in indices]
    except TypeError as e:
        raise VideoError(index, f"frame indices must be integers ({e})") from e
    meta, packets = _inspect(data, index)
    bad = [i for i in indices if not 0 <= i < meta.n_frames]
    if bad:
        raise VideoError(index, f"frame {bad[0]} out of range: the video has {meta.n_frames} frames")
    if not indices:
        return []
    wanted = sorted(set(indices))

    got = None
    pts = [p.pts for p in packets]
    if None not in pts and len(set(pts)) == len(pts):
        # Frame number = rank of the frame's pts: true wherever the decoder starts.
        got = _decode_by_pts(data, packets, wanted, meta.n_frames, index, seek=True)
        if got is None:  # a seek that missed or a format that cannot seek
            got = _decode_by_pts(data, packets, wanted, meta.n_frames, index, seek=False)
    if got is None:  # no usable timestamps: number the frames as they come out
        got = _decode_counting(data, wanted, meta.n_frames, index)

    out, seen = [], set()
    for i in indices:
        # A repeated index gets its own copy: callers may resize or edit images in place.
        out.append(got[i].copy() if i in seen else got[i])
        seen.add(i)
    return out


def _missing(index: int, want: list[int], got: dict, decoded: int, n_frames: int) -> VideoError:
    missing = [i for i in want if i not in got]
    return VideoError(
        index, f"the video is truncated or corrupt: {decoded} of its {n_frames} frames decoded, "
        f"frame {missing[0]} not among them ({len(got)} of {len(want)} wanted frames decoded)")


def _decode_by_pts(data: bytes, packets: list[_Packet], wanted: list[int], n_frames: int, index: int,
                   seek: bool) -> dict[int, Image.Image] | None:
    """Decode `wanted`, numbering frames by pts and, with `seek`, jumping to the keyframe
    before a wanted frame instead of decoding up to it. None when the caller must fall back:
    a decoded frame with a pts the demuxer never listed, or (with `seek`) a failed or missed
    seek. Without `seek`, raises VideoError if a wanted frame never comes out."""
    order = sorted(p.pts for p in packets)
    rank = {t: i for i, t in enumerate(order)}  # pts -> frame number
    # Where to seek for the keyframe numbered k: its dts when that is earlier (mov indexes
    # samples by dts), so a backward seek never lands past it.
    seek_ts = {rank[p.pts]: p.pts if p.dts is None else min(p.pts, p.dts) for p in packets if p.key}
    keys = sorted(seek_ts) if seek else []

    want = set(wanted)
    got: dict[int, Image.Image] = {}
    decoded = 0
    with _open(data, index) as (container, stream), _av_errors(index, "decode the video"):
        frames = container.decode(stream)  # from the start of the file: no seek for the first run
        last = -1  # the latest frame number the current run produced
        for w in wanted:
            if w in got:  # came out while decoding towards an earlier one
                continue
            at = bisect.bisect_right(keys, w) - 1
            if at >= 0 and keys[at] > last + 1:
                # A keyframe lies between here and w: seek there, skipping the frames between.
                try:
                    container.seek(seek_ts[keys[at]], stream=stream, backward=True)
                except av.error.FFmpegError:
                    return None
                frames = container.decode(stream)
            for frame in frames:
                num = rank.get(frame.pts)
                if num is None:
                    return None
                decoded += 1
                last = num
                if num in want and num not in got:
                    got[num] = frame.to_image()  # only sampled frames are converted
                if num >= w:
                    break
            if w not in got:
                if seek:
                    return None  # a seek landed past w, or the clip is cut: decode from the start
                break
    if len(got) < len(want):
        raise _missing(index, wanted, got, decoded, n_frames)
    return got


def _decode_counting(data: bytes, wanted: list[int], n_frames: int, index: int) -> dict[int, Image.Image]:
    """Decode from the start, numbering frames in output order."""
    want = set(wanted)
    got: dict[int, Image.Image] = {}
    decoded = 0
    with _open(data, index) as (container, stream), _av_errors(index, "decode the video"):
        for frame in container.decode(stream):
            if decoded in want:
                got[decoded] = frame.to_image()
            decoded += 1
            if decoded > wanted[-1]:
                break
    if len(got) < len(want):
        raise _missing(index, wanted, got, decoded, n_frames)
    return got


# --- sampling rules ----------------------------------------------------------------------------


def internvl_indices(n_frames: int, num_segments: int) -> list[int]:
    """InternVL's `get_index` (its README's `load_video`) with bound=None: the middle frame of
    each of `num_segments` equal segments; repeats when the video has fewer frames."""
    if n_frames < 1:
        raise VideoError(0, "the video has no frames")
    if num_segments < 1:
        raise ValueError(f"num_segments must be at least 1, got {num_segments}")
    start_idx, max_frame = 0, n_frames - 1  # bound=None: the whole clip
    seg_size = float(max_frame - start_idx) / num_segments
    # np.round, not round(): the reference rounds half to even through numpy.
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


@dataclass(frozen=True)
class QwenSampling:
    indices: list[int]
    sample_fps: float  # the frame rate of the sampled frames (the model's second_per_grid)


def _round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def _ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def _floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def qwen_sampling(n_frames: int, video_fps: float, *, fps: float = 2.0, num_frames: int | None = None,
                  min_frames: int = 4, max_frames: int = 768, frame_factor: int = 2,
                  index: int = 0) -> QwenSampling:
    """qwen-vl-utils' `smart_nframes` and frame indices: `num_frames` frames (rounded to the
    frame factor) if given, else `fps` frames a second clamped to [min_frames, max_frames]
    and the clip's length; evenly spread over the clip. Raises VideoError when fewer than
    `frame_factor` or more than `n_frames` frames would be sampled."""
    import torch  # the reference's linspace/round, bit for bit; torch is heavy to import

    if num_frames is not None:
        nframes = _round_by_factor(num_frames, frame_factor)
    else:
        if not video_fps > 0:
            raise VideoError(index, f"the video has no usable frame rate ({video_fps})")
        min_f = _ceil_by_factor(min_frames, frame_factor)
        max_f = _floor_by_factor(min(max_frames, n_frames), frame_factor)
        nframes = n_frames / video_fps * fps
        nframes = min(min(max(nframes, min_f), max_f), n_frames)
        nframes = _floor_by_factor(nframes, frame_factor)
    if not (frame_factor <= nframes <= n_frames):
        asked = f"num_frames={num_frames}" if num_frames is not None else f"fps={fps}"
        raise VideoError(index, f"cannot sample {nframes} frames ({asked}) from a video of {n_frames} "
                         f"frames: nframes should be in interval [{frame_factor}, {n_frames}]")
    idx = torch.linspace(0, n_frames - 1, nframes).round().long().tolist()
    return QwenSampling(indices=idx, sample_fps=nframes / max(n_frames, 1e-6) * video_fps)
