"""InternVL checkpoint configuration, parsed from either on-disk layout.

The original layout (`model_type: internvl_chat`, `vision_config` + `llm_config`) and the
transformers one (`model_type: internvl`, `vision_config` + `text_config`) describe the same
model with different key names; both are read into one `InternVLConfig` so the rest of the
code never looks at raw JSON.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import read_json
from ..errors import ConfigError
from ..llm.config import LLMConfig, parse_llm_config

# An id this high exists only in a Qwen2 vocabulary (151674 tokens; InternLM2's has 92553),
# and <IMG_CONTEXT>'s id in it (DESIGN §4): see `_parse_hf`.
QWEN2_VOCAB_MIN_ID = 151_000
QWEN2_IMAGE_CONTEXT_ID = 151_667

__all__ = ["ConfigError", "InternVLConfig", "LLMConfig", "VisionConfig", "check_image_length", "load_config",
           "stop_token_ids"]


@dataclass
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_type: str = "layer_norm"  # or "rms_norm" (InternViT-6B)
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class InternVLConfig:
    layout: str  # "original" | "hf"
    vision: VisionConfig
    llm: LLMConfig
    downsample_ratio: float = 0.5
    template: str = "internvl2_5"
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    torch_dtype: str = "bfloat16"
    system_message: str | None = None

    @property
    def image_tokens_per_tile(self) -> int:
        """Tokens one tile becomes. INTERNVL_IMAGE_LENGTH (LightLLM's name) may only restate it:
        `load_config` refuses a value that disagrees (`check_image_length`)."""
        side = self.vision.image_size // self.vision.patch_size
        return int(side * side * self.downsample_ratio**2)

    def shard_vision_weights(self, weights: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
        """This rank's slice of the ViT (see `sharding.py`); `models.parallel.shard_weights` calls it."""
        from .sharding import shard_vision_weights

        return shard_vision_weights(weights, self, rank, size)


def _get(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def _as_int(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def _parse_vision(vc: dict[str, Any], layout: str, force_image_size: Any) -> VisionConfig:
    try:
        hidden = int(vc["hidden_size"])
        return VisionConfig(
            hidden_size=hidden,
            num_layers=int(vc["num_hidden_layers"]),
            num_heads=int(vc["num_attention_heads"]),
            intermediate_size=int(vc["intermediate_size"]),
            image_size=_as_int(force_image_size or vc.get("image_size", 448)),
            patch_size=_as_int(vc.get("patch_size", 14)),
            num_channels=int(vc.get("num_channels", 3)),
            qkv_bias=bool(vc.get("qkv_bias" if layout == "original" else "attention_bias", layout == "original")),
            qk_norm=bool(vc.get("qk_normalization" if layout == "original" else "use_qk_norm", False)),
            norm_type=str(vc.get("norm_type", "layer_norm")),
            norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
        )
    except KeyError as e:
        raise ConfigError(f"vision_config is missing {e.args[0]!r}") from None


def load_config(model_dir: str | os.PathLike) -> InternVLConfig:
    """Read config.json (and, for the transformers layout, preprocessor_config.json)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{model_dir} has no config.json; is it an InternVL checkpoint directory?")
    raw = read_json(cfg_path)
    model_type = raw.get("model_type")
    if model_type == "internvl_chat":
        return check_image_length(_parse_original(raw))
    if model_type == "internvl":
        return check_image_length(_parse_hf(raw, model_dir))
    raise ConfigError(
        f"config.json model_type {model_type!r} is not an InternVL checkpoint (expected 'internvl_chat' or 'internvl')"
    )


def _parse_original(raw: dict[str, Any]) -> InternVLConfig:
    if "vision_config" not in raw or "llm_config" not in raw:
        raise ConfigError("config.json (internvl_chat) needs both 'vision_config' and 'llm_config'")
    ps_version = raw.get("ps_version", "v1")
    if ps_version != "v2":
        raise ConfigError(
            f"ps_version {ps_version!r} is not supported: only pixel shuffle 'v2' (InternVL2/2.5/3) is implemented"
        )
    select_layer = raw.get("select_layer", -1)
    if select_layer != -1:
        raise ConfigError(f"select_layer {select_layer} is not supported; only -1 (last ViT layer)")
    llm = parse_llm_config(raw["llm_config"], "llm_config")
    default_template = "internvl2_5" if llm.model_type == "qwen2" else "internlm2-chat"
    system_message = raw.get("system_message")
    return InternVLConfig(
        layout="original",
        vision=_parse_vision(raw["vision_config"], "original", raw.get("force_image_size")),
        llm=llm,
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        template=str(raw.get("template") or default_template),
        max_dynamic_patch=int(raw.get("max_dynamic_patch", 12)) if raw.get("dynamic_image_size", True) else 1,
        min_dynamic_patch=int(raw.get("min_dynamic_patch", 1)),
        use_thumbnail=bool(raw.get("use_thumbnail", True)),
        torch_dtype=str(raw.get("torch_dtype") or raw["llm_config"].get("torch_dtype") or "bfloat16"),
        system_message=system_message if isinstance(system_message, str) else None,
    )


def _parse_hf(raw: dict[str, Any], model_dir: Path) -> InternVLConfig:
    if "vision_config" not in raw or "text_config" not in raw:
        raise ConfigError("config.json (internvl) needs both 'vision_config' and 'text_config'")
    if raw.get("vision_feature_layer", -1) != -1:
        raise ConfigError("vision_feature_layer other than -1 is not supported")
    llm = parse_llm_config(raw["text_config"], "text_config")
    # Tile cap and thumbnail live with the image processor in this layout.
    pp = {}
    if (model_dir / "preprocessor_config.json").is_file():
        pp = read_json(model_dir / "preprocessor_config.json")
    crop = bool(pp.get("crop_to_patches", True))
    size = pp.get("size") or {}
    image_size = size.get("height") if isinstance(size, dict) else None
    # The -hf conversion rewrote InternLM2 as llama with the same tokenizer, so the LLM type no
    # longer tells the chat template; the tokenizer family does, and the <IMG_CONTEXT> id the
    # config records shows which vocabulary it is.
    image_token_id = int(raw.get("image_token_id", QWEN2_IMAGE_CONTEXT_ID))
    template = "internvl2_5" if image_token_id >= QWEN2_VOCAB_MIN_ID else "internlm2-chat"
    return InternVLConfig(
        layout="hf",
        vision=_parse_vision(raw["vision_config"], "hf", image_size),
        llm=llm,
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        template=str(raw.get("template") or template),
        max_dynamic_patch=int(pp.get("max_patches", 12)) if crop else 1,
        min_dynamic_patch=int(pp.get("min_patches", 1)),
        use_thumbnail=True,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or raw["text_config"].get("torch_dtype") or "bfloat16"),
    )


def stop_token_ids(model_dir: str | os.PathLike, tokenizer, llm_eos: list[int]) -> list[int]:
    """Chat generation stops on <|im_end|> and on the generation_config's EOS ids."""
    ids: list[int] = []
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        eos = read_json(path).get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    if not ids:
        ids = list(llm_eos)
    return sorted(set(int(i) for i in ids))


def check_image_length(cfg: InternVLConfig) -> InternVLConfig:
    """INTERNVL_IMAGE_LENGTH must agree with what the ViT geometry produces per tile."""
    v = cfg.vision
    geometric = cfg.image_tokens_per_tile
    env = os.environ.get("INTERNVL_IMAGE_LENGTH")
    if env is None or env == "":
        return cfg
    try:
        value = int(env)
    except ValueError:
        raise ConfigError(f"INTERNVL_IMAGE_LENGTH={env!r} is not an integer") from None
    if value != geometric:
        raise ConfigError(
            f"INTERNVL_IMAGE_LENGTH={value} disagrees with the checkpoint: {v.image_size}px tiles, patch "
            f"{v.patch_size}, downsample {cfg.downsample_ratio} give {geometric} tokens per tile"
        )
    return cfg
