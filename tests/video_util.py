"""Small synthetic video clips written with PyAV into memory, for the video tests.

Every frame carries its own frame number in binary as a row of big black/white blocks
(top half), so `frame_number` reads it back after lossy compression and a test can check
which frames a decoder returned; the bottom half holds flat seeded colour blocks that change
every frame, so the encoder has real motion to code (P/B-frames, not copies).
"""

from __future__ import annotations

import io
import os
import tempfile

import av
import numpy as np

BITS = 8  # frame numbers 0..255: ample for test clips

# The encoder each container uses when the caller names none, best first: the first one
# this PyAV wheel ships wins.
_DEFAULT_CODECS = {
    "mp4": ("libx264", "mpeg4"),
    "mov": ("libx264", "mpeg4"),
    "webm": ("libvpx-vp9", "libvpx"),
    "gif": ("gif",),
}


def encoder_for(fmt: str) -> str | None:
    """The encoder make_clip would use for container `fmt`, or None if the wheel has none."""
    for name in _DEFAULT_CODECS[fmt]:
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
            except Exception:  # listed but not an encoder in this build
                continue
            return name
    return None


def frame_image(k: int, width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """Frame k as an RGB uint8 array: frame-number bits on top, seeded colour blocks below."""
    if width < 2 * BITS or height < 8:
        raise ValueError("clip too small to carry the frame-number bits")
    img = np.zeros((height, width, 3), np.uint8)
    top = height // 2
    bw = width // BITS
    for b in range(BITS):  # most significant bit leftmost; white = 1
        if (k >> (BITS - 1 - b)) & 1:
            img[:top, b * bw:(b + 1) * bw] = 255
    # Four flat colour blocks, a deterministic function of (seed, k) with large steps.
    rng = np.random.default_rng(seed * 1_000_003 + k)
    qw = width // 4
    for q in range(4):
        img[top:, q * qw:(q + 1) * qw] = rng.integers(0, 6, 3) * 51
    return img


def frame_number(img) -> int:
    """The frame number a make_clip frame carries (PIL image or HxWx3 array)."""
    a = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img).astype(np.float32)
    height, width = a.shape[:2]
    top, bw = height // 2, width // BITS
    k = 0
    for b in range(BITS):
        # The middle of each block: away from edges that compression smears.
        block = a[top // 4: 3 * top // 4, b * bw + bw // 4: (b + 1) * bw - bw // 4]
        k = (k << 1) | int(block.mean() > 127)
    return k


def make_clip(n_frames: int = 12, fps: int = 6, width: int = 64, height: int = 48, fmt: str = "mp4",
              codec: str | None = None, seed: int = 0, gop_size: int | None = 4,
              faststart: bool = False) -> bytes:
    """A clip of `n_frames` frames at `fps`, encoded in memory to container `fmt` ("mp4", "mov",
    "webm", "gif").

    `gop_size` is the keyframe interval (small, so decoders have keyframes to seek to);
    None gives a single keyframe at frame 0. `faststart` (mp4/mov) puts the index before the
    frame data, as streaming uploads have it: a file cut short then still opens, listing
    frames whose data is gone. Raises RuntimeError if the wheel has no encoder for `fmt`
    (tests skip on it).
    """
    codec = codec or encoder_for(fmt)
    if codec is None:
        raise RuntimeError(f"this PyAV build has no encoder for {fmt}")
    args = (n_frames, fps, width, height, fmt, codec, seed, gop_size)
    if faststart:
        # The muxer moves the index by re-reading its output: it needs a real file.
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"clip.{fmt}")
            _encode(path, *args, options={"movflags": "faststart"})
            with open(path, "rb") as f:
                return f.read()
    buf = io.BytesIO()
    _encode(buf, *args, options={})
    return buf.getvalue()


def _encode(target, n_frames: int, fps: int, width: int, height: int, fmt: str, codec: str, seed: int,
            gop_size: int | None, options: dict[str, str]) -> None:
    with av.open(target, mode="w", format=fmt, options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        cc = stream.codec_context
        cc.gop_size = gop_size if gop_size else n_frames + 1
        if codec.startswith("libx264"):
            # Near-lossless, B-frames on (veryfast keeps them), and no scene-cut keyframes:
            # every frame changes colour, which x264 would otherwise take for a scene cut.
            cc.options = {"crf": "10", "preset": "veryfast", "x264-params": "scenecut=0"}
        elif codec.startswith("libvpx"):
            cc.options = {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        elif codec in ("mpeg4", "msmpeg4"):
            cc.bit_rate = 4_000_000
        for k in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(k, width, height, seed), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
