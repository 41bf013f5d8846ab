"""LMDeploy-style pipeline options, so LMDeploy code runs with its import changed:

    from mmserver import pipeline, TurbomindEngineConfig, ChatTemplateConfig, VisionConfig
    pipe = pipeline(model, backend_config=TurbomindEngineConfig(tp=1, session_len=8192, max_batch_size=32,
                                                                 cache_max_entry_count=0.5),
                    chat_template_config=ChatTemplateConfig(model_name="llava-v1", system="…"),
                    vision_config=VisionConfig(max_batch_size=8))

`TurbomindEngineConfig`, `PytorchEngineConfig` and `EngineOptions` are one class. An option
name this server does not know is an error naming it (nothing is silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class _Options:
    """Keyword-only construction that names unknown options."""

    def __init__(self, **kwargs: Any):
        known = {f.name for f in fields(self)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        for f in fields(self):
            setattr(self, f.name, kwargs.get(f.name, f.default))
        self.check()

    def check(self) -> None: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in fields(self))})"


@dataclass(init=False, repr=False)
class EngineOptions(_Options):
    tp: int = 1  # tensor-parallel ranks of the language model
    session_len: int | None = None  # prompt + new tokens of one request (None: the engine's 8192)
    max_batch_size: int | None = None  # requests running at once (None: 64)
    # KV cache: on CUDA the fraction of the free device memory after loading (LMDeploy's
    # meaning); on CPU, where nothing is measured, it is not used. An int > 1: that many tokens.
    cache_max_entry_count: float = 0.8
    max_prefill_token_num: int | None = None  # prompt tokens prefilled per step (chunk size)
    enable_prefix_caching: bool = True

    def check(self) -> None:
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp must be a positive integer, got {self.tp!r}")
        for name in ("session_len", "max_batch_size", "max_prefill_token_num"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.cache_max_entry_count, (int, float)) and self.cache_max_entry_count > 0):
            raise ValueError(f"cache_max_entry_count must be > 0, got {self.cache_max_entry_count!r}")


TurbomindEngineConfig = EngineOptions
PytorchEngineConfig = EngineOptions


@dataclass(init=False, repr=False)
class ChatTemplateConfig(_Options):
    model_name: str | None = None  # a template name (see models/chat_templates.py) or a jinja file
    system: str | None = None  # replaces the template's default system prompt
    meta_instruction: str | None = None  # LMDeploy's other name for `system`

    def check(self) -> None:
        if self.system is None and self.meta_instruction is not None:
            self.system = self.meta_instruction


@dataclass(init=False, repr=False)
class VisionConfig(_Options):
    max_batch_size: int = 1  # images per vision-encoder call

    def check(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"VisionConfig.max_batch_size must be a positive integer, got {self.max_batch_size!r}")
