"""LLaVA prompts: the llava-hf chat templates and `<image>` expansion.

Two templates, chosen from the checkpoint (its chat template's text, else the backbone):

    vicuna ("llava-v1"; llava-1.5-*-hf, llava-v1.6-vicuna-*-hf):
        "USER: <image>\\n<image>\\nWhat is this? ASSISTANT:"   (a turn's images first, then its
        texts, each followed by a space; a system turn is its text and a space)
    mistral (llava-v1.6-mistral-*-hf):
        "[INST] <image>\\nWhat is this? [/INST]"  (system: "<<SYS>>\\n…\\n<</SYS>>\\n\\n";
        an answer: " text</s>"; no generation prompt)

The tokenizer adds BOS (`<s>`), as transformers' processor does; each `<image>` (id 32000)
becomes the image's n copies.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import PromptError

IMAGE = "<image>"
VICUNA, MISTRAL = "vicuna", "mistral"
_IMAGE_PARTS = ("image", "image_url", "image_data", "image_embeds")


def template_kind(chat_template: str, backbone: str) -> str:
    if "[INST]" in chat_template:
        return MISTRAL
    if "USER" in chat_template:
        return VICUNA
    return MISTRAL if backbone == "mistral" else VICUNA


def _parts(content: Any) -> tuple[int, list[str]]:
    """A message's image count and its texts."""
    if content is None:
        return 0, []
    if isinstance(content, str):
        return 0, [content]
    images, texts = 0, []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text", ""))
        elif kind in _IMAGE_PARTS:
            images += 1
        else:
            raise PromptError(f"content part type {kind!r} is not supported (use 'text' or 'image_url')")
    return images, texts


def render_chat(kind: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    out = ""
    for m in messages:
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise PromptError(f"message role {role!r} is not one of 'system', 'user', 'assistant'")
        images, texts = _parts(m.get("content"))
        if kind == VICUNA:
            if role != "system":
                out += role.upper() + ": "
            out += f"{IMAGE}\n" * images + "".join(t + " " for t in texts)
        elif role == "system":
            out += "<<SYS>>\n" + (texts[0] if texts else "") + "\n<</SYS>>\n\n"
        elif role == "user":
            out += "[INST] " + f"{IMAGE}\n" * images + "".join(texts) + " [/INST]"
        else:
            out += "".join(" " + t + "</s>" for t in texts)
    if add_generation_prompt and kind == VICUNA:
        out += "ASSISTANT:"
    return out


def expand_prompt(tokenizer, prompt: str, token_counts: Sequence[int],
                  image_id: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize (BOS added) and expand the i-th `<image>` to token_counts[i] copies; returns
    the ids and each image's (start, length)."""
    token_ids = tokenizer(prompt)["input_ids"]
    n = token_ids.count(image_id)
    if n != len(token_counts):
        raise PromptError(f"prompt has {n} image placeholder(s) ({IMAGE}) but {len(token_counts)} image(s) were given")
    out: list[int] = []
    spans: list[tuple[int, int]] = []
    for tok in token_ids:
        if tok != image_id:
            out.append(tok)
            continue
        count = token_counts[len(spans)]
        spans.append((len(out), count))
        out.extend([image_id] * count)
    return out, spans


def image_spans(ids: Sequence[int], image_id: int, sizes: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Runs of the image id in bare ids (adjacent images merge unless `sizes` splits them)."""
    spans: list[tuple[int, int]] = []
    for i, tok in enumerate(ids):
        if tok != image_id:
            continue
        if spans and spans[-1][0] + spans[-1][1] == i:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
    return spans
