"""Qwen2-VL prompts: the chat template, image-placeholder expansion and M-RoPE positions.

An image's place is `<|vision_start|><|image_pad|><|vision_end|>` (what the template renders
for an image part), or `<image>`, which stands for exactly that; the single `<|image_pad|>`
becomes the image's n tokens. Positions follow transformers 5.23's `get_rope_index`: text runs
0, 1, 2, … on all three rows; an image's merged token (y, x) at start s gets (s, s + y, s + x)
and the text after it continues at s + max(H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import PromptError

IMAGE_PLACEHOLDER = "<image>"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
_IMAGE_PARTS = ("image", "image_url", "image_data", "image_embeds")


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
        else:
            raise PromptError(f"content part type {kind!r} is not supported (use 'text' or 'image_url')")
    return "".join(out)


def render_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The checkpoints' chat_template.json: a default system turn unless the first message is
    one; image parts render in place, with no separators."""
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


@dataclass(frozen=True)
class SpecialIds:
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int


def expand_prompt(tokenizer, prompt: str, token_counts: Sequence[int],
                  ids: SpecialIds) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize (no special tokens added) and expand the i-th `<|image_pad|>` to token_counts[i]
    copies; returns the ids and each image's (start, length)."""
    token_ids = tokenizer(prompt.replace(IMAGE_PLACEHOLDER, VISION), add_special_tokens=False)["input_ids"]
    if ids.video_pad in token_ids:
        raise PromptError("videos are not supported (the prompt has <|video_pad|>)")
    n = token_ids.count(ids.image_pad)
    if n != len(token_counts):
        raise PromptError(f"prompt has {n} image placeholder(s) (<image> or {VISION}) but {len(token_counts)} "
                          "image(s) were given")
    out: list[int] = []
    spans: list[tuple[int, int]] = []
    for tok in token_ids:
        if tok != ids.image_pad:
            out.append(tok)
            continue
        count = token_counts[len(spans)]
        spans.append((len(out), count))
        out.extend([ids.image_pad] * count)
    return out, spans


def pad_spans(ids: Sequence[int], image_pad: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for i, tok in enumerate(ids):
        if tok != image_pad:
            continue
        if spans and spans[-1][0] + spans[-1][1] == i:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
    return spans


def rope_index(n: int, spans: Sequence[tuple[int, int]], grids: Sequence[tuple[int, ...]],
               merge: int = 2) -> tuple[np.ndarray, int]:
    """M-RoPE positions [3, n] of a prompt of n tokens whose images fill `spans` (grids (t, h, w)
    of patches), and rope_delta = max position + 1 - n (a later token at index j: j + delta)."""
    if len(spans) != len(grids):
        raise PromptError(f"{len(spans)} image spans but {len(grids)} image grids")
    pos = np.empty((3, n), dtype=np.int64)
    cur = end = 0
    for (start, length), grid in zip(spans, grids):
        if len(grid) != 3:
            raise PromptError("an M-RoPE image needs its grid (t, h, w); precomputed embeddings must carry grid_thw")
        t, h, w = (int(g) for g in grid)
        gh, gw = h // merge, w // merge
        if t * gh * gw != length or start < end:
            raise PromptError(f"image span ({start}, {length}) does not fit its grid {tuple(grid)}")
        pos[:, end:start] = np.arange(cur, cur + start - end)
        cur += start - end
        tt, yy, xx = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        pos[0, start:start + length] = cur + tt.reshape(-1)
        pos[1, start:start + length] = cur + yy.reshape(-1)
        pos[2, start:start + length] = cur + xx.reshape(-1)
        cur += max(gh, gw)  # transformers 5.23 (for t = 1 images also 4.x's max + 1)
        end = start + length
    pos[:, end:] = np.arange(cur, cur + n - end)
    return pos, int(pos.max()) + 1 - n if n else 0
