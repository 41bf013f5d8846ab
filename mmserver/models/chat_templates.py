"""Chat templates chosen by name or file, over a family's own (LMDeploy's `ChatTemplateConfig`,
the server's `--chat_template NAME|FILE`).

Named templates (LMDeploy's names, their turn markers):

    llava-v1   "{system} USER: <image>\\n{text} ASSISTANT: {answer}</s>…"   (LLaVA-1.5 / Vicuna LLaVA-NeXT)
    vicuna     the same with Vicuna's system prompt
    mistral    "[INST] <image>\\n{text} [/INST] {answer}</s>…" (llava-v1.6-mistral; system as <<SYS>>)
    chatml     "<|im_start|>{role}\\n{text}<|im_end|>\\n…<|im_start|>assistant\\n"
    base       the turns' texts as they are

A turn's images go first, one "<image>\\n" each (the family expands `<image>`). A FILE is a jinja
chat template (transformers' form: `messages`, `add_generation_prompt`, image parts as
{"type": "image"}). `system` replaces the template's default system prompt (and, with no name,
becomes a system turn for the family's own template).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError, PromptError

ENV = "MMSERVER_CHAT_TEMPLATE"  # what --chat_template sets for every process
ENV_SYSTEM = "MMSERVER_CHAT_SYSTEM"
_IMAGE_PARTS = ("image", "image_url", "image_data", "image_embeds")
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")
_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class _Named:
    system: str  # default system prompt
    sys_fmt: str  # "{s}" → the system block
    user: str  # "{u}" → a user turn
    assistant: str  # "{a}" → an answer
    generation: str  # appended for the generation prompt


NAMED: dict[str, _Named] = {
    "llava-v1": _Named(_LLAVA_SYSTEM, "{s} ", "USER: {u} ", "ASSISTANT: {a}</s>", "ASSISTANT: "),
    "vicuna": _Named(_VICUNA_SYSTEM, "{s} ", "USER: {u} ", "ASSISTANT: {a}</s>", "ASSISTANT: "),
    "mistral": _Named("", "<<SYS>>\n{s}\n<</SYS>>\n\n", "[INST] {u} [/INST]", " {a}</s>", ""),
    "chatml": _Named("You are a helpful assistant.", "<|im_start|>system\n{s}<|im_end|>\n",
                     "<|im_start|>user\n{u}<|im_end|>\n", "<|im_start|>assistant\n{a}<|im_end|>\n",
                     "<|im_start|>assistant\n"),
    "base": _Named("", "{s}", "{u}", "{a}", ""),
}


def _turn(content: Any, placeholder: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    images, texts = 0, []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text", ""))
        elif kind in _IMAGE_PARTS:
            images += 1
        else:
            raise PromptError(f"content part type {kind!r} is not supported (use 'text' or 'image_url')")
    return f"{placeholder}\n" * images + "".join(texts)


@dataclass(frozen=True)
class ChatOverride:
    """A template that replaces a family's own: `name` (NAMED, or a jinja file path; None: the
    family's own), `system` (None: the template's default)."""

    name: str | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None and self.name not in NAMED and not Path(self.name).is_file():
            raise ConfigError(f"chat template {self.name!r} is neither a known name ({', '.join(NAMED)}) "
                              "nor a file")

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, placeholder: str,
               own: Callable[[Sequence[dict[str, Any]], bool], str]) -> str:
        has_system = bool(messages) and messages[0].get("role") == "system"
        if self.system is not None and not has_system:
            messages = [{"role": "system", "content": self.system}, *messages]
        if self.name is None:
            return own(messages, add_generation_prompt)
        if self.name not in NAMED:
            return _render_file(self.name, messages, add_generation_prompt)
        t = NAMED[self.name]
        out = "" if messages and messages[0].get("role") == "system" or not t.system else t.sys_fmt.format(s=t.system)
        for m in messages:
            role, text = m.get("role"), _turn(m.get("content"), placeholder)
            if role == "system":
                out += t.sys_fmt.format(s=text)
            elif role == "user":
                out += t.user.format(u=text)
            elif role == "assistant":
                out += t.assistant.format(a=text)
            else:
                raise PromptError(f"message role {role!r} is not one of 'system', 'user', 'assistant'")
        return out + (t.generation if add_generation_prompt else "")


def _render_file(path: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    norm = [{**m, "content": [{"type": "image"} if p.get("type") in _IMAGE_PARTS else p for p in m["content"]]}
            if isinstance(m.get("content"), list) else m for m in messages]
    try:
        return env.from_string(Path(path).read_text(encoding="utf-8")).render(
            messages=norm, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise PromptError(f"chat template {path}: {e}") from None


def from_env() -> ChatOverride | None:
    """The override --chat_template set for this process (None: the family's own)."""
    name, system = os.environ.get(ENV) or None, os.environ.get(ENV_SYSTEM)
    return ChatOverride(name, system) if name or system is not None else None
