"""Qwen2-VL prompts: the chat template, image- and video-placeholder expansion and M-RoPE
positions.

An image's place is `<|vision_start|><|image_pad|><|vision_end|>` (what the template renders
for an image part), or `<image>`, which stands for exactly that; a video's is
`<|vision_start|><|video_pad|><|vision_end|>`, or `<video>`. The single pad token becomes the
image's (video's) n tokens.

Positions follow transformers 5.23's `get_rope_index` (the project's oracle): text runs
0, 1, 2, … on all three rows; merged token (tt, y, x) of an image or video starting at s gets
(s + T(tt), s + y, s + x), where T(tt) = tt for images and Qwen2-VL videos and, for a
Qwen2.5-VL video, the temporal offset `(tt · tokens_per_second · second_per_grid_t)` truncated
in float32 (carried in the grid: `video_offsets`). The text after ANY vision item continues at
s + max(H, W), its spatial extent only. transformers 4.x (and vLLM, LMDeploy) continue at
max(position) + 1 instead: the two agree for images but not for videos whose temporal extent
exceeds their spatial one (reference notes qwen2_vl.md §4.3); we follow 5.23.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import PromptError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
_IMAGE_PARTS = ("image", "image_url", "image_data", "image_embeds")
_VIDEO_PARTS = ("video", "video_url")


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            out.append(part.get("text", ""))
        elif kind in _IMAGE_PARTS:
            out.append(VISION)
        elif kind in _VIDEO_PARTS:
            out.append(VIDEO)
        else:
            raise PromptError(f"content part type {kind!r} is not supported (use 'text', 'image_url' or 'video_url')")
    return "".join(out)


def render_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The checkpoints' chat_template.json: a default system turn unless the first message is
    one; image and video parts render in place, with no separators."""
    out = ""
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise PromptError(f"message role {role!r} is not one of 'system', 'user', 'assistant'")
        if i == 0 and role != "system":
            out += f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        out += f"<|im_start|>{role}\n{_content(m.get('content'))}<|im_end|>\n"
    if not messages:
        out += f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    if add_generation_prompt:
        out += "<|im_start|>assistant\n"
    return out


def question_with_images(text: str, num_images: int) -> str:
    """A (text, images) turn: the images go first, as image parts before a text part render."""
    if num_images == 0 or IMAGE_PLACEHOLDER in text or "<|image_pad|>" in text:
        return text
    return VISION * num_images + text


def question_with_media(text: str, num_images: int, num_videos: int) -> str:
    """A (text, [videos and images]) turn: the videos first, then the images, then the text
    (unless the text places them)."""
    text = question_with_images(text, num_images)
    if num_videos == 0 or VIDEO_PLACEHOLDER in text or "<|video_pad|>" in text:
        return text
    return VIDEO * num_videos + text


@dataclass(frozen=True)
class SpecialIds:
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int


def expand_media(tokenizer, prompt: str, image_counts: Sequence[int], video_counts: Sequence[int],
                 ids: SpecialIds) -> tuple[list[int], list[tuple[int, int]], list[tuple[str, int]]]:
    """Tokenize (no special tokens added) and expand the i-th `<|image_pad|>` to image_counts[i]
    copies and the j-th `<|video_pad|>` to video_counts[j]; returns the ids, every span
    (start, length) in prompt order and, per span, ("image", i) or ("video", j)."""
    text = prompt.replace(IMAGE_PLACEHOLDER, VISION).replace(VIDEO_PLACEHOLDER, VIDEO)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_img, n_vid = token_ids.count(ids.image_pad), token_ids.count(ids.video_pad)
    if (n_img, n_vid) != (len(image_counts), len(video_counts)):
        raise PromptError(f"prompt has {n_img} image placeholder(s) (<image> or {VISION}) and {n_vid} video "
                          f"placeholder(s) (<video> or {VIDEO}) but {len(image_counts)} image(s) and "
                          f"{len(video_counts)} video(s) were given")
    out: list[int] = []
    spans: list[tuple[int, int]] = []
    items: list[tuple[str, int]] = []
    nxt = {"image": 0, "video": 0}
    for tok in token_ids:
        kind = "image" if tok == ids.image_pad else "video" if tok == ids.video_pad else None
        if kind is None:
            out.append(tok)
            continue
        i = nxt[kind]
        nxt[kind] += 1
        count = (image_counts if kind == "image" else video_counts)[i]
        spans.append((len(out), count))
        items.append((kind, i))
        out.extend([tok] * count)
    return out, spans, items


def expand_prompt(tokenizer, prompt: str, token_counts: Sequence[int],
                  ids: SpecialIds) -> tuple[list[int], list[tuple[int, int]]]:
    """`expand_media` with images only; returns the ids and each image's (start, length)."""
    out, spans, _ = expand_media(tokenizer, prompt, token_counts, (), ids)
    return out, spans


def pad_spans(ids: Sequence[int], *pads: int) -> list[tuple[int, int]]:
    """The runs of any of `pads` in ids (a run ends where the pad token changes)."""
    spans: list[tuple[int, int]] = []
    prev = None
    for i, tok in enumerate(ids):
        if tok not in pads:
            prev = None
            continue
        if tok == prev:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
        prev = tok
    return spans


def video_offsets(t: int, second_per_grid_t: float, tokens_per_second: int) -> tuple[int, ...]:
    """Qwen2.5-VL's temporal positions of a video's t temporal patches (before the start is
    added), as transformers 5.23's `get_vision_position_ids`: `(arange(t) · time_interval).long()`
    with time_interval = tokens_per_second · second_per_grid_t, all in float32 (the processor
    hands second_per_grid_ts over as a float32 tensor)."""
    interval = np.float32(tokens_per_second) * np.float32(second_per_grid_t)
    return tuple(int(x) for x in (np.arange(t, dtype=np.float32) * interval).astype(np.int64))


def rope_index(n: int, spans: Sequence[tuple[int, int]], grids: Sequence[tuple[int, ...]],
               merge: int = 2) -> tuple[np.ndarray, int]:
    """M-RoPE positions [3, n] of a prompt of n tokens whose images and videos fill `spans`, and
    rope_delta = max position + 1 - n (a later token at index j: j + delta).

    A grid is (t, h, w) in patches (an image: t = 1; a Qwen2-VL video: temporal position
    start + tt), or (t, h, w, *offsets) with t offsets (a Qwen2.5-VL video: start + offsets[tt],
    see `video_offsets`). After every item the text continues at start + max(h, w) / merge
    (transformers 5.23; see the module docstring)."""
    if len(spans) != len(grids):
        raise PromptError(f"{len(spans)} image/video spans but {len(grids)} grids")
    pos = np.empty((3, n), dtype=np.int64)
    cur = end = 0
    for (start, length), grid in zip(spans, grids):
        if len(grid) < 3:
            raise PromptError("an M-RoPE image needs its grid (t, h, w); precomputed embeddings must carry grid_thw")
        t, h, w = (int(g) for g in grid[:3])
        if len(grid) == 3:
            temporal = np.arange(t)
        elif len(grid) == 3 + t:
            temporal = np.asarray([int(o) for o in grid[3:]], dtype=np.int64)
        else:
            raise PromptError(f"grid {tuple(grid)}: expected (t, h, w) or (t, h, w) and t temporal offsets")
        gh, gw = h // merge, w // merge
        if t * gh * gw != length or start < end:
            raise PromptError(f"image span ({start}, {length}) does not fit its grid {tuple(grid)}")
        pos[:, end:start] = np.arange(cur, cur + start - end)
        cur += start - end
        tt, yy, xx = np.meshgrid(temporal, np.arange(gh), np.arange(gw), indexing="ij")
        pos[0, start:start + length] = cur + tt.reshape(-1)
        pos[1, start:start + length] = cur + yy.reshape(-1)
        pos[2, start:start + length] = cur + xx.reshape(-1)
        cur += max(gh, gw)  # transformers 5.23, for videos too (4.x: max position + 1; equal for images)
        end = start + length
    pos[:, end:] = np.arange(cur, cur + n - end)
    return pos, int(pos.max()) + 1 - n if n else 0
