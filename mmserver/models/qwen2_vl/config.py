"""Qwen2-VL / Qwen2.5-VL checkpoint configuration.

Hub checkpoints carry a flat config.json (text keys at the top level, `rope_scaling` with
`mrope_section`) whose `vision_config` is often sparse: the missing keys take transformers'
class defaults, listed here. transformers 5 writes a nested one (`text_config` with
`rope_parameters`); both are read. Naming traps: Qwen2-VL's `vision_config.hidden_size` is the
merger's OUTPUT (= the LLM width; the ViT width is `embed_dim`), Qwen2.5-VL's is the ViT width
(the output is `out_hidden_size`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import read_json
from ..errors import ConfigError
from ..llm.config import LLMConfig, parse_llm_config

QWEN2_VL, QWEN2_5_VL = "qwen2_vl", "qwen2_5_vl"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Qwen2VLImageProcessor's class defaults (every hub preprocessor_config.json sets max_pixels
# = 16384·28·28 instead)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280

_VISION_DEFAULTS = {
    QWEN2_VL: dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu",
                   in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2),
    QWEN2_5_VL: dict(depth=32, hidden_size=3584, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                     hidden_act="silu", in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                     window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=4),
}


@dataclass
class VisionConfig:
    kind: str  # qwen2_vl | qwen2_5_vl
    depth: int
    width: int  # the ViT's hidden size
    num_heads: int
    intermediate_size: int
    hidden_act: str
    out_hidden_size: int  # the merger's output: the LLM's hidden size
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 0  # Qwen2.5-VL: window side in pixels (112); 0: no window attention
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch row: C·T·P·P (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (28)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def window(self) -> int:
        """Window side in merged tokens (4), 0 without window attention."""
        return self.window_size // self.spatial_merge_size // self.patch_size if self.window_size else 0

    @property
    def rms_norm(self) -> bool:
        return self.kind == QWEN2_5_VL


@dataclass
class QwenVLConfig:
    kind: str  # qwen2_vl | qwen2_5_vl
    vision: VisionConfig
    llm: LLMConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    min_pixels: int = DEFAULT_MIN_PIXELS  # the checkpoint's preprocessor range
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    torch_dtype: str = "bfloat16"
    generation_eos: list[int] = field(default_factory=list)

    def shard_vision_weights(self, weights: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
        """This rank's slice of the ViT (see `sharding.py`); `models.parallel.shard_weights` calls it."""
        from .sharding import shard_vision_weights

        return shard_vision_weights(weights, self.vision, rank, size)


def _mrope_section(*sections: dict[str, Any]) -> list[int]:
    for d in sections:
        for key in ("rope_scaling", "rope_parameters"):
            rope = d.get(key)
            if isinstance(rope, dict) and rope.get("mrope_section"):
                return [int(x) for x in rope["mrope_section"]]
    return [16, 24, 24]  # transformers' default


def parse_vision(kind: str, vc: dict[str, Any]) -> VisionConfig:
    """`vision_config` with transformers' class defaults for every missing key."""
    v = {**_VISION_DEFAULTS[kind], **{k: x for k, x in vc.items() if x is not None}}
    rope = v.get("rope_parameters") if isinstance(v.get("rope_parameters"), dict) else {}
    try:
        if kind == QWEN2_VL:
            width, out, inter = int(v["embed_dim"]), int(v["hidden_size"]), int(int(v["embed_dim"]) * v["mlp_ratio"])
        else:
            width, out, inter = int(v["hidden_size"]), int(v["out_hidden_size"]), int(v["intermediate_size"])
        cfg = VisionConfig(
            kind=kind, depth=int(v["depth"]), width=width, num_heads=int(v["num_heads"]), intermediate_size=inter,
            hidden_act=str(v["hidden_act"]), out_hidden_size=out, in_channels=int(v["in_channels"]),
            patch_size=int(v["patch_size"]), temporal_patch_size=int(v["temporal_patch_size"]),
            spatial_merge_size=int(v["spatial_merge_size"]),
            window_size=int(v.get("window_size", 0)) if kind == QWEN2_5_VL else 0,
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", ())),
            tokens_per_second=int(v.get("tokens_per_second", 0)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"vision_config has a bad value: {e}") from None
    if cfg.width % cfg.num_heads or cfg.head_dim % 4:
        raise ConfigError(f"vision_config: width {cfg.width} / {cfg.num_heads} heads must give a head_dim that is a "
                          "multiple of 4 (2-D rotary)")
    if cfg.window_size and cfg.window_size % (cfg.spatial_merge_size * cfg.patch_size):
        raise ConfigError(f"vision_config.window_size {cfg.window_size} is not a multiple of "
                          f"{cfg.spatial_merge_size * cfg.patch_size}")
    return cfg


def _llm_section(raw: dict[str, Any]) -> dict[str, Any]:
    """The LLM keys: the flat layout's top level, or the nested layout's `text_config` over it."""
    lc = {k: v for k, v in raw.items() if k not in ("vision_config", "text_config")}
    text = raw.get("text_config")
    if isinstance(text, dict):
        lc.update({k: v for k, v in text.items() if v is not None})
        if "tie_word_embeddings" in raw:  # transformers 5 keeps it at the top level
            lc["tie_word_embeddings"] = raw["tie_word_embeddings"]
    lc["model_type"] = "qwen2"
    lc.setdefault("tie_word_embeddings", False)
    return lc


def parse_config(raw: dict[str, Any], model_dir: Path) -> QwenVLConfig:
    kind = raw.get("model_type")
    if kind not in (QWEN2_VL, QWEN2_5_VL):
        archs = raw.get("architectures") or []
        kind = QWEN2_5_VL if "Qwen2_5_VLForConditionalGeneration" in archs else QWEN2_VL
    vision = parse_vision(kind, raw.get("vision_config") or {})
    lc = _llm_section(raw)
    llm = parse_llm_config(lc, "config.json (text)")
    llm.mrope_section = tuple(_mrope_section(raw, raw.get("text_config") or {}))
    if sum(llm.mrope_section) * 2 != llm.head_dim or len(llm.mrope_section) != 3:
        raise ConfigError(f"mrope_section {list(llm.mrope_section)} must have 3 parts summing to head_dim/2 = "
                          f"{llm.head_dim // 2}")
    if vision.out_hidden_size != llm.hidden_size:
        raise ConfigError(f"the vision merger outputs {vision.out_hidden_size} but the LLM is {llm.hidden_size} wide "
                          "(Qwen2-VL: vision_config.hidden_size; Qwen2.5-VL: out_hidden_size)")
    cfg = QwenVLConfig(
        kind=kind, vision=vision, llm=llm,
        image_token_id=int(raw.get("image_token_id", 151655)), video_token_id=int(raw.get("video_token_id", 151656)),
        vision_start_token_id=int(raw.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(raw.get("vision_end_token_id", 151653)),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or lc.get("torch_dtype") or "bfloat16"),
    )
    _read_preprocessor(cfg, model_dir)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = read_json(gen).get("eos_token_id")
        cfg.generation_eos = [int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    return cfg


def _read_preprocessor(cfg: QwenVLConfig, model_dir: Path) -> None:
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return  # the processor's class defaults
    pp = read_json(path)
    size = pp.get("size") if isinstance(pp.get("size"), dict) else {}
    cfg.min_pixels = int(pp.get("min_pixels") or size.get("shortest_edge") or DEFAULT_MIN_PIXELS)
    cfg.max_pixels = int(pp.get("max_pixels") or size.get("longest_edge") or DEFAULT_MAX_PIXELS)
    v = cfg.vision
    for key, ours in (("patch_size", v.patch_size), ("temporal_patch_size", v.temporal_patch_size),
                      ("merge_size", v.spatial_merge_size)):
        if pp.get(key) is not None and int(pp[key]) != ours:
            raise ConfigError(f"preprocessor_config.json {key} {pp[key]} disagrees with the model's {ours}")
    cfg.image_mean = tuple(float(x) for x in pp.get("image_mean") or CLIP_MEAN)
    cfg.image_std = tuple(float(x) for x in pp.get("image_std") or CLIP_STD)
    if not 0 < cfg.min_pixels <= cfg.max_pixels:
        raise ConfigError(f"preprocessor_config.json: min_pixels {cfg.min_pixels} / max_pixels {cfg.max_pixels}")


def load_config(model_dir: str | os.PathLike) -> QwenVLConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no config.json; is it a checkpoint directory?")
    return parse_config(read_json(path), model_dir)
