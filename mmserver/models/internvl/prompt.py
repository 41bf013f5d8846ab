"""Prompts: InternVL chat templates and image-placeholder expansion into token ids."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import PromptError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PAIR = "<img></img>"
_MEDIA = re.compile(f"({re.escape(VIDEO_PLACEHOLDER)}|{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(_PAIR)})")

SYSTEM_INTERNVL2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_INTERNVL2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclass(frozen=True)
class ChatTemplate:
    """MPT-style conversation as in InternVL's conversation.py."""

    name: str
    system: str
    sep: str  # after every finished turn

    def render(self, messages: Sequence[dict[str, Any]], system_message: str | None = None,
               add_generation_prompt: bool = True) -> str:
        msgs = list(messages)
        system = self.system if system_message is None else system_message
        if msgs and msgs[0].get("role") == "system":
            system = _text_of(msgs.pop(0).get("content"))
        out = f"<|im_start|>system\n{system}{self.sep}" if system else ""
        for m in msgs:
            role = m.get("role")
            if role not in ("user", "assistant"):
                raise PromptError(f"message role {role!r} is not one of 'system', 'user', 'assistant'")
            out += f"<|im_start|>{role}\n{_text_of(m.get('content'))}{self.sep}"
        if add_generation_prompt:
            out += "<|im_start|>assistant\n"
        return out


TEMPLATES = {
    "internvl2_5": ChatTemplate("internvl2_5", SYSTEM_INTERNVL2_5, "<|im_end|>\n"),
    "Hermes-2": ChatTemplate("Hermes-2", SYSTEM_INTERNVL2, "<|im_end|>"),
    "internlm2-chat": ChatTemplate("internlm2-chat", SYSTEM_INTERNVL2, "<|im_end|>"),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise PromptError(f"chat template {name!r} is not supported; supported: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _text_of(content: Any) -> str:
    """Message content as text; image parts become `<image>` where they stand."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        kind = item.get("type")
        if kind == "text":
            parts.append(item.get("text", ""))
        elif kind in ("image", "image_url", "image_data"):
            parts.append(IMAGE_PLACEHOLDER + "\n")
        elif kind in ("video", "video_url"):
            parts.append(VIDEO_PLACEHOLDER)  # its frames' expansion ends in a newline
        else:
            raise PromptError(f"content part type {kind!r} is not supported (use 'text', 'image_url' or 'video_url')")
    return "".join(parts)


def question_with_images(text: str, num_images: int) -> str:
    """The original chat(): images go before the question unless the text places them."""
    if num_images == 0 or IMAGE_PLACEHOLDER in text or _PAIR in text:
        return text
    if num_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images)) + text


@dataclass(frozen=True)
class SpecialIds:
    img_start: int
    img_end: int
    img_context: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        ids = tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise PromptError("tokenizer lacks the InternVL tokens <img>, </img>, <IMG_CONTEXT>")
        return cls(*ids)


def frames_prompt(n_frames: int) -> str:
    """What `<video>` stands for: InternVL's `Frame{i}: <image>\n` per frame, i from 1."""
    return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_frames))


def split_media(prompt: str) -> list[tuple[str, str]]:
    """The prompt as ("text", …), ("image", placeholder) and ("video", placeholder) pieces, in order."""
    out = []
    for i, piece in enumerate(_MEDIA.split(prompt)):
        if i % 2 == 0:
            if piece:
                out.append(("text", piece))
        else:
            out.append(("video" if piece == VIDEO_PLACEHOLDER else "image", piece))
    return out


def count_placeholders(prompt: str) -> int:
    return prompt.count(IMAGE_PLACEHOLDER) + prompt.count(_PAIR)


def expand_prompt(tokenizer, prompt: str, token_counts: Sequence[int],
                  ids: SpecialIds) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize `prompt` and expand the i-th placeholder to `<img>` + context·token_counts[i] +
    `</img>` (256 per tile); returns the ids and each image's (start, length) context span.

    `<image>` becomes the pair `<img></img>` before tokenizing (both are single added tokens,
    so text on either side tokenizes as it would around the full expansion); the context
    tokens are then inserted between each pair, which is much faster than tokenizing
    thousands of `<IMG_CONTEXT>` strings.
    """
    if "<IMG_CONTEXT>" in prompt:
        raise PromptError("prompt contains the reserved token <IMG_CONTEXT>; mark images with <image>")
    n = count_placeholders(prompt)
    if n != len(token_counts):
        raise PromptError(
            f"prompt has {n} image placeholder(s) (<image>) but {len(token_counts)} image(s) were given"
        )
    token_ids = tokenizer(prompt.replace(IMAGE_PLACEHOLDER, _PAIR), add_special_tokens=True)["input_ids"]
    out: list[int] = []
    spans: list[tuple[int, int]] = []
    for pos, tok in enumerate(token_ids):
        out.append(tok)
        if tok == ids.img_start and pos + 1 < len(token_ids) and token_ids[pos + 1] == ids.img_end:
            if len(spans) == len(token_counts):
                raise PromptError(f"found more image placeholders after tokenization than the {len(token_counts)} expected")
            count = token_counts[len(spans)]
            spans.append((len(out), count))
            out.extend([ids.img_context] * count)
    if len(spans) != len(token_counts):  # a placeholder glued to other text tokenized differently
        raise PromptError(f"found {len(spans)} image placeholder(s) after tokenization, expected {len(token_counts)}")
    return out, spans


def context_spans(ids: Sequence[int], context_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of `context_id` in `ids`: one run per image, since every
    image's context tokens sit between its own `<img>` and `</img>`."""
    spans: list[tuple[int, int]] = []
    for i, tok in enumerate(ids):
        if tok != context_id:
            continue
        if spans and spans[-1][0] + spans[-1][1] == i:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
    return spans
