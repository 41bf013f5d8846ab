"""Workloads and result helpers shared by ``benchmark_serving.py`` and ``bench_hf.py``.

Every request is a prompt in the InternVL2.5 chat format plus PNG file bytes. Images are
synthesised in-process so the benchmark needs no data set and the same ``--seed`` always
gives the same bytes:

* content = per-image random smooth field (three-corner colour gradient + four random
  low-frequency sinusoids per channel) + Gaussian "texture" noise on 4x4-pixel blocks
  (sigma 6), with no per-pixel noise;
* saved with ``compress_level=1`` (fast to encode; sizes ~230 KB at 448x448 and
  ~0.8 MB at 1280x720, close to photo PNGs -- pure per-pixel noise would be ~600 KB at
  448x448 and a flat gradient only a few KB, neither realistic).

| name | image             | images                            | prompt text                       |
|------|-------------------|-----------------------------------|-----------------------------------|
| W1   | 448x448 (1 tile)  | one distinct image per request    | question padded to ~N words       |
| W2   | 1280x720 (9 tiles)| one distinct image per request    | question padded to ~N words       |
| W3   | 448x448 (1 tile)  | pool of 8, request i uses i % 8   | prior user/assistant turn + follow-up |
| W4   | 448x448 (1 tile)  | sessions: 2 distinct in turn 1, 1 more in turn 3 | multi-turn chat, full history re-sent |
| W5   | 4 s 448x448 clip, 24 fps (H.264 mp4) | one distinct video per request | "<video>" + question padded to ~N words |

W5's clips pan a `make_image` picture (each frame a shifted window of a wider one), encoded
with PyAV (libx264, a keyframe a second): InternVL samples 8 frames of one tile, Qwen2-VL
2 fps = 8 frames. Building it needs PyAV (`pip install av`).

W4 is built as sessions (`build_sessions`), not requests: each turn's prompt is the whole
conversation so far with the answers the server actually gave, so the client builds it as the
session runs (`benchmark_serving.py`).
"""

from __future__ import annotations

import io
import math
import os
import platform
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
QUESTION = "What is shown in this image? Please describe the picture in detail."
FOLLOW_UP = "Thanks. Now tell me what colours dominate the picture and where they are."
PRIOR_ANSWER = (
    "The image shows a smooth colourful pattern with soft waves of light and shadow, "
    "a gradient from one corner to the other and a fine grainy texture on top."
)
# Common English words, almost all single tokens in Qwen2 / InternLM2 vocabularies.
FILLER_WORDS = (
    "the image picture photo colour light shadow left right top bottom middle corner "
    "small large bright dark soft sharp line shape object scene detail texture pattern "
    "background foreground area part side edge centre view"
).split()
# Distinct seed streams so workloads / warmup never share images by accident.
_WORKLOAD_TAGS = {"W1": 1, "W2": 2, "W3": 3, "W4": 4, "W5": 5}


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    description: str
    image_size: tuple[int, int]  # (width, height)
    image_pool: int | None  # None: a fresh image per request; k: k images reused round-robin
    multi_turn: bool
    clip: tuple[float, int] | None = None  # a video workload: (seconds, fps) of each request's clip


WORKLOADS: dict[str, WorkloadSpec] = {
    "W1": WorkloadSpec("W1", "one distinct 448x448 image per request, short question", (448, 448), None, False),
    "W2": WorkloadSpec("W2", "one distinct 1280x720 image per request (9 tiles)", (1280, 720), None, False),
    "W3": WorkloadSpec("W3", "pool of 8 448x448 images reused (cache hits), multi-turn prompt",
                       (448, 448), 8, True),
    "W4": WorkloadSpec("W4", "multi-turn sessions re-sending their history (KV prefix cache), images in turns 1 "
                       "and 3", (448, 448), None, True),
    "W5": WorkloadSpec("W5", "one distinct 4 s 448x448 24-fps clip per request (video)", (448, 448), None, False,
                       clip=(4.0, 24)),
}  # fmt: skip
IMAGE_WORKLOADS = sorted(k for k, spec in WORKLOADS.items() if spec.clip is None)
SESSION_QUESTIONS = (
    "Compare these two pictures. What do they have in common?",
    "Which of them is brighter, and why do you think so?",
    "Here is one more picture. How does it differ from the first two?",
    "Summarise everything we discussed in one sentence.",
)


@dataclass
class BenchSession:
    """One W4 conversation: per turn, the user's text (with IMAGE_PLACEHOLDERs) and its images."""

    index: int
    questions: list[str]
    images: list[list[bytes]]
    image_ids: list[list[int]]

    def prompt(self, answers: Sequence[str]) -> tuple[str, list[bytes]]:
        """Turn len(answers)'s prompt (the history with these answers) and every image so far."""
        t = len(answers)
        text = chat_prompt(list(zip(self.questions[:t], answers)) + [(self.questions[t], None)])
        return text, [png for turn in self.images[:t + 1] for png in turn]


def build_sessions(num_sessions: int, turns: int, seed: int = 0, prompt_tokens: int = 30,
                   progress: bool = True) -> list[BenchSession]:
    """W4: `num_sessions` conversations of `turns` turns; two distinct images in turn 1 and one
    more in turn 3 (if there is one); deterministic in `seed`."""
    width, height = WORKLOADS["W4"].image_size
    tag = _WORKLOAD_TAGS["W4"]
    with_image = [t for t in (0, 0, 2) if t < turns]
    ids = [[s * 3 + k for k, t in enumerate(with_image) if t == turn] for s in range(num_sessions)
           for turn in range(turns)]
    unique = sorted({i for turn in ids for i in turn})
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        it: Iterable[bytes] = pool.map(lambda i: encode_png(make_image(width, height, (seed, tag, i))), unique)
        if progress:
            it = tqdm(it, total=len(unique), desc="W4 images", unit="img", file=sys.stderr)
        pngs = dict(zip(unique, it))
    sessions = []
    for s in range(num_sessions):
        rng = np.random.default_rng((seed, tag, 1_000_000 + s))
        turn_ids = ids[s * turns:(s + 1) * turns]
        questions = []
        for t in range(turns):
            base = SESSION_QUESTIONS[t % len(SESSION_QUESTIONS)]
            pad = " ".join(rng.choice(FILLER_WORDS, max(0, prompt_tokens - len(base.split()))))
            questions.append("".join(f"{IMAGE_PLACEHOLDER}\n" for _ in turn_ids[t]) + f"{base} {pad}".strip())
        sessions.append(BenchSession(s, questions, [[pngs[i] for i in t] for t in turn_ids], turn_ids))
    return sessions


@dataclass
class BenchRequest:
    index: int
    prompt: str  # full chat-formatted text with one IMAGE_PLACEHOLDER per image
    images: list[bytes]  # PNG file bytes, in placeholder order
    image_ids: list[int]  # ids of the generated images (equal ids = identical bytes)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    videos: list[bytes] = field(default_factory=list)  # mp4 file bytes, in `<video>` order
    video_ids: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------ images


def make_image(width: int, height: int, seed: int | Sequence[int]) -> np.ndarray:
    """A smooth random RGB image with block texture; distinct seeds give distinct content."""
    rng = np.random.default_rng(seed)
    x = (np.arange(width, dtype=np.float32) / width)[None, :]
    y = (np.arange(height, dtype=np.float32) / height)[:, None]
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(0, 255, 3)
        img[..., c] = a * (1 - x) + b * x * y + d * y * (1 - x)
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 6.0, 2)
            amp, phase = rng.uniform(10, 40), rng.uniform(0, 2 * np.pi)
            # sin(u + v) = sin u cos v + cos u sin v: 1-D trig only, the 2-D part is products.
            u, v = 2 * np.pi * fx * x + phase, 2 * np.pi * fy * y
            img[..., c] += amp * (np.sin(u) * np.cos(v) + np.cos(u) * np.sin(v))
    # Texture on 4x4 blocks: enough entropy for photo-like PNG sizes, unlike per-pixel noise.
    block = rng.normal(0, 6.0, (height // 4 + 1, width // 4 + 1, 3)).astype(np.float32)
    img += np.repeat(np.repeat(block, 4, 0), 4, 1)[:height, :width]
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) * (255.0 / max(hi - lo, 1e-6))
    return img.astype(np.uint8)


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_clip(width: int, height: int, seconds: float, fps: int, seed: int | Sequence[int]) -> bytes:
    """An H.264 mp4 panning across a `make_image` picture twice as wide: frame k is the window
    starting k·(width / frames) pixels in (distinct frames; a keyframe each second)."""
    import av

    n = max(1, round(seconds * fps))
    wide = make_image(2 * width, height, seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = fps
        stream.codec_context.options = {"crf": "23", "preset": "veryfast"}
        for k in range(n):
            x = k * width // n
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(wide[:, x:x + width]), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def num_tiles(width: int, height: int, max_patches: int = 12, min_patches: int = 1, tile: int = 448) -> int:
    """Tiles InternVL's dynamic preprocessing makes (incl. the thumbnail when > 1 block)."""
    aspect = width / height
    ratios = sorted(
        {(i, j) for n in range(min_patches, max_patches + 1) for i in range(1, n + 1) for j in range(1, n + 1)
         if min_patches <= i * j <= max_patches},
        key=lambda r: r[0] * r[1],
    )  # fmt: skip
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * r[0] * r[1]:
            best = r
    blocks = best[0] * best[1]
    return blocks + (1 if blocks != 1 else 0)


# ----------------------------------------------------------------------- prompts


def chat_prompt(turns: Sequence[tuple[str, str | None]]) -> str:
    """InternVL2.5 chat format (no system turn); the last turn's answer is left open."""
    parts = []
    for user, assistant in turns:
        parts.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        if assistant is not None:
            parts.append(f"{assistant}<|im_end|>\n")
    return "".join(parts)


def padded_question(rng: np.random.Generator, words: int) -> str:
    """QUESTION plus random filler words up to ``words`` words (~1 token each)."""
    n_pad = max(0, words - len(QUESTION.split()))
    pad = " ".join(rng.choice(FILLER_WORDS, n_pad)) if n_pad else ""
    return f"{QUESTION} {pad}".strip()


# --------------------------------------------------------------------- workloads


def build_workload(
    name: str, num_requests: int, seed: int = 0, prompt_tokens: int = 30, progress: bool = True
) -> list[BenchRequest]:
    """``num_requests`` requests of workload ``name``; deterministic in ``seed``."""
    if name not in WORKLOADS or name == "W4":
        raise ValueError(f"unknown request workload {name!r}; choose from {sorted(set(WORKLOADS) - {'W4'})} "
                         "(W4 is built by build_sessions)")
    spec = WORKLOADS[name]
    width, height = spec.image_size
    tag = _WORKLOAD_TAGS[name]
    ids = [i % spec.image_pool if spec.image_pool else i for i in range(num_requests)]
    unique = sorted(set(ids))

    def render(image_id: int) -> bytes:
        if spec.clip is not None:
            return make_clip(width, height, *spec.clip, (seed, tag, image_id))
        return encode_png(make_image(width, height, (seed, tag, image_id)))

    # numpy and zlib release the GIL, so threads give a real speed-up here.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        it: Iterable[bytes] = pool.map(render, unique)
        if progress:
            it = tqdm(it, total=len(unique), desc=f"{name} {'videos' if spec.clip else 'images'}",
                      unit="video" if spec.clip else "img", file=sys.stderr)
        pngs = dict(zip(unique, it))

    requests = []
    for i, image_id in enumerate(ids):
        rng = np.random.default_rng((seed, tag, 1_000_000 + i))
        question = padded_question(rng, prompt_tokens)
        if spec.clip is not None:  # the frames' expansion (InternVL) ends in a newline
            prompt = chat_prompt([(f"{VIDEO_PLACEHOLDER}{question}", None)])
            requests.append(BenchRequest(i, prompt, [], [], [], [pngs[image_id]], [image_id]))
            continue
        if spec.multi_turn:
            prompt = chat_prompt([(f"{IMAGE_PLACEHOLDER}\n{question}", PRIOR_ANSWER), (FOLLOW_UP, None)])
        else:
            prompt = chat_prompt([(f"{IMAGE_PLACEHOLDER}\n{question}", None)])
        requests.append(BenchRequest(i, prompt, [pngs[image_id]], [image_id], [(width, height)]))
    return requests


# ------------------------------------------------------------- results helpers


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def scaled(x: float | None, factor: float) -> float | None:
    return None if x is None or math.isnan(x) else x * factor


def fmt(x: float | int | str | None, digits: int = 2) -> str:
    """RESULT-line value: ``null`` for missing numbers so the line stays key=value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "null"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def result_line(fields: Sequence[tuple[str, object, int]]) -> str:
    """``RESULT k=v ...`` from (key, value, decimals) triples."""
    return "RESULT " + " ".join(f"{k}={fmt(v, d)}" for k, v, d in fields)  # type: ignore[arg-type]


def parse_result_line(line: str) -> dict[str, str]:
    if not line.startswith("RESULT "):
        raise ValueError(f"not a RESULT line: {line!r}")
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def print_table(rows: Sequence[tuple[str, str]], title: str) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"==== {title} ====")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def run_info() -> dict[str, str]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "client_host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_report(path, report: dict) -> None:
    """Write a benchmark's JSON report (config, metrics, records), creating the folder."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def add_workload_args(p, parallel_flag: str, parallel_help: str, workloads: Sequence[str] = tuple(WORKLOADS)) -> None:
    """The flags both benchmarks share, so a workload means the same in either; `parallel_flag`
    is how many requests run at once (--concurrency for a server, --batch-size for generate)."""
    from pathlib import Path

    p.add_argument("--workload", choices=sorted(workloads), required=True)
    p.add_argument("--num-requests", type=int, required=True)
    p.add_argument(parallel_flag, type=int, required=True, help=parallel_help)
    p.add_argument("--output-len", type=int, required=True)
    p.add_argument("--json", type=Path, default=None, help="write config + metrics + per-request records here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-tokens", type=int, default=30, help="approximate words of question text")


def check_positive(p, args, names: Sequence[str]) -> None:
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
