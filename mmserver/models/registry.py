"""Which model family serves a checkpoint directory, decided from its config.json.

As LightLLM's `ModelRegistry`: each entry names the `architectures` and `model_type`s it
serves, plus an optional condition on the rest of the config (e.g. the LLM type), and the
first entry that matches wins. Adding a family is one line here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import read_json
from .errors import ConfigError
from .family import LoadedModel, ModelFamily
from .internvl.family import InternVLFamily
from .llava.family import LlavaFamily
from .qwen2_vl.family import QwenVLFamily


@dataclass(frozen=True)
class Entry:
    family: type[ModelFamily]
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    condition: Callable[[dict[str, Any]], bool] | None = None

    def matches(self, raw: dict[str, Any]) -> bool:
        archs = raw.get("architectures") or []
        named = raw.get("model_type") in self.model_types or any(a in self.architectures for a in archs)
        return named and (self.condition is None or self.condition(raw))


FAMILIES: tuple[Entry, ...] = (
    Entry(InternVLFamily, ("InternVLChatModel", "InternVLForConditionalGeneration"), ("internvl_chat", "internvl")),
    Entry(QwenVLFamily, ("Qwen2VLForConditionalGeneration",), ("qwen2_vl",)),
    Entry(QwenVLFamily, ("Qwen2_5_VLForConditionalGeneration",), ("qwen2_5_vl",)),
    Entry(LlavaFamily, ("LlavaForConditionalGeneration",), ("llava",)),
    Entry(LlavaFamily, ("LlavaNextForConditionalGeneration",), ("llava_next",)),
)


def supported() -> str:
    """The supported architectures (and model types), for error messages and --help."""
    return "; ".join(f"{', '.join(e.architectures)} (model_type {', '.join(e.model_types)})" for e in FAMILIES)


def env_help() -> str:
    """The environment variables the families read, for --help."""
    return "; ".join(f"{e.family.name}: {e.family.env_help}" for e in FAMILIES if e.family.env_help)


def read_config_json(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no config.json; is it a checkpoint directory?")
    return read_json(path)


def family_class(raw: dict[str, Any]) -> type[ModelFamily]:
    """The family whose entry matches a parsed config.json; ConfigError naming the
    architecture and listing the supported ones otherwise."""
    for entry in FAMILIES:
        if entry.matches(raw):
            return entry.family
    archs = raw.get("architectures") or []
    raise ConfigError(f"unsupported model: architectures {archs} (model_type {raw.get('model_type')!r}); "
                      f"supported: {supported()}")


def load_family(model_dir: str | os.PathLike, trust_remote_code: bool = False) -> ModelFamily:
    """The checkpoint's family, its config read and checked (no weights yet)."""
    return family_class(read_config_json(model_dir))(model_dir, trust_remote_code=trust_remote_code)


def load_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True) -> LoadedModel:
    """Load any supported checkpoint. The config is read and checked before any weight is,
    so an unsupported checkpoint fails fast with a clear error."""
    return load_family(model_dir).load_model(device, dtype, progress=progress)
