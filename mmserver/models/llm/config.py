"""The language model's configuration, shared by every family whose LLM is a Qwen2, InternLM2
or LLaMA decoder: one `LLMConfig` read from the checkpoint's LLM section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

SUPPORTED_LLMS = ("qwen2", "internlm2", "llama")


@dataclass
class LLMConfig:
    model_type: str  # qwen2 | internlm2 | llama
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    qkv_bias: bool = False
    head_dim: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # M-RoPE (Qwen2-VL): rotary frequencies per position row (t, h, w), summing to head_dim / 2;
    # () for plain RoPE
    mrope_section: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads


def _eos_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _rope_theta(lc: dict[str, Any]) -> float:
    # transformers 5 moved it under rope_parameters
    if lc.get("rope_theta") is not None:
        return float(lc["rope_theta"])
    return float((lc.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def parse_llm_config(lc: dict[str, Any], section: str) -> LLMConfig:
    """An LLM section of config.json (`section` names it in errors)."""
    model_type = lc.get("model_type")
    if model_type not in SUPPORTED_LLMS:
        raise ConfigError(
            f"{section}.model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_LLMS)}"
        )
    try:
        heads = int(lc["num_attention_heads"])
        qkv_bias = model_type == "qwen2" or bool(lc.get("attention_bias", False))
        if model_type == "internlm2":
            qkv_bias = bool(lc.get("bias", False))
        return LLMConfig(
            model_type=model_type,
            hidden_size=int(lc["hidden_size"]),
            num_layers=int(lc["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(lc.get("num_key_value_heads") or heads),
            intermediate_size=int(lc["intermediate_size"]),
            vocab_size=int(lc["vocab_size"]),
            rms_norm_eps=float(lc.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(lc),
            max_position_embeddings=int(lc.get("max_position_embeddings", 32768)),
            qkv_bias=qkv_bias,
            head_dim=int(lc.get("head_dim") or 0),
            tie_word_embeddings=bool(lc.get("tie_word_embeddings", False)),
            bos_token_id=lc.get("bos_token_id"),
            eos_token_ids=_eos_list(lc.get("eos_token_id")),
        )
    except KeyError as e:
        raise ConfigError(f"{section} is missing {e.args[0]!r}") from None
