"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`)
checkpoint configuration, llava-hf layout.

Hub config.json files are sparse: `text_config` and `vision_config` list only what differs
from transformers' class defaults (LlamaConfig / MistralConfig / CLIPVisionConfig), which are
filled in here; a missing `vision_config` is LLaVA's CLIP ViT-L/336. Preprocessing comes from
preprocessor_config.json (CLIPImageProcessor / LlavaImageProcessor / LlavaNextImageProcessor).
Mistral backbones run as LLaMA (same math); a `sliding_window` shorter than the context caps
the positions the server accepts, so the window never matters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import read_json
from ..errors import ConfigError
from ..llm.config import LLMConfig, parse_llm_config

LLAVA, LLAVA_NEXT = "llava", "llava_next"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
_LLAVA_VISION = dict(_CLIP_DEFAULTS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, image_size=336, patch_size=14)  # LlavaConfig without vision_config
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096, bos_token_id=1, eos_token_id=2),
}


@dataclass
class ClipConfig:
    width: int
    depth: int  # layers the tower RUNS: up to the feature layer
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    hidden_act: str
    norm_eps: float
    feature_layers: tuple[int, ...]  # indices into hidden_states (0: the embeddings), all >= 0
    num_layers: int = 0  # layers in the checkpoint

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side (24)."""
        return self.image_size // self.patch_size

    @property
    def out_width(self) -> int:
        return self.width * len(self.feature_layers)


@dataclass
class LlavaConfig:
    kind: str  # llava | llava_next
    vision: ClipConfig
    llm: LLMConfig
    image_token_id: int = 32000
    select_strategy: str = "default"  # default: CLS dropped; full: kept
    projector_act: str = "gelu"
    projector_bias: bool = True
    pinpoints: list[list[int]] = field(default_factory=list)  # [[h, w], …] (NeXT)
    image_newline: bool = True  # NeXT
    # preprocessing (preprocessor_config.json)
    shortest_edge: int = 336
    crop: tuple[int, int] = (336, 336)  # (h, w)
    do_center_crop: bool = True
    do_pad: bool = False  # LLaVA-1.5: pad to a square with the mean colour first
    resample: int = 3  # PIL bicubic
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    backbone: str = "llama"  # llama | mistral (text_config.model_type)
    chat_template: str = ""  # the checkpoint's jinja template, if any
    torch_dtype: str = "float16"
    generation_eos: list[int] = field(default_factory=list)

    @property
    def tile_tokens(self) -> int:
        """Rows one 336×336 tile gives (576; 577 with the CLS kept)."""
        return self.vision.grid ** 2 + (self.select_strategy == "full")

    def shard_vision_weights(self, weights: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
        """The CLIP tower and the projector are small next to the LLM: replicated on every rank."""
        return dict(weights)


def _feature_layers(raw: Any, num_layers: int) -> tuple[int, ...]:
    layers = raw if isinstance(raw, (list, tuple)) else [raw]
    out = []
    for layer in layers:
        i = int(layer)
        j = i + num_layers + 1 if i < 0 else i  # hidden_states has num_layers + 1 entries
        if not 0 <= j <= num_layers:
            raise ConfigError(f"vision_feature_layer {layer} is outside the tower's {num_layers} layers")
        out.append(j)
    return tuple(out)


def parse_vision(raw: dict[str, Any]) -> ClipConfig:
    vc = raw.get("vision_config")
    if vc is None:
        v = dict(_LLAVA_VISION)
    else:
        if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ConfigError(f"vision_config.model_type {vc.get('model_type')!r} is not supported (CLIP only)")
        v = {**_CLIP_DEFAULTS, **{k: x for k, x in vc.items() if x is not None}}
    try:
        n = int(v["num_hidden_layers"])
        feats = _feature_layers(raw.get("vision_feature_layer", -2), n)
        cfg = ClipConfig(width=int(v["hidden_size"]), depth=max(feats), num_heads=int(v["num_attention_heads"]),
                         intermediate_size=int(v["intermediate_size"]), image_size=int(v["image_size"]),
                         patch_size=int(v["patch_size"]), hidden_act=str(v["hidden_act"]),
                         norm_eps=float(v["layer_norm_eps"]), feature_layers=feats, num_layers=n)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"vision_config has a bad value: {e}") from None
    if int(v.get("num_channels", 3)) != 3:
        raise ConfigError("vision_config.num_channels must be 3")
    if cfg.image_size % cfg.patch_size or cfg.width % cfg.num_heads:
        raise ConfigError(f"vision_config: image_size {cfg.image_size} / patch_size {cfg.patch_size} / "
                          f"hidden_size {cfg.width} / heads {cfg.num_heads} do not divide")
    return cfg


def _llm_section(raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    text = raw.get("text_config")
    text = dict(text) if isinstance(text, dict) else {}
    backbone = text.get("model_type") or "llama"
    if backbone not in _TEXT_DEFAULTS:
        raise ConfigError(f"text_config.model_type {backbone!r} is not supported; supported: llama, mistral")
    lc = {**_TEXT_DEFAULTS[backbone], **{k: v for k, v in text.items() if v is not None or k == "sliding_window"}}
    if isinstance(lc.get("rope_parameters"), dict) and "rope_theta" not in text:
        lc["rope_theta"] = lc["rope_parameters"].get("rope_theta", lc["rope_theta"])
    rope = lc.get("rope_scaling") or (lc.get("rope_parameters") or {})
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"text_config rope scaling {rope} is not supported")
    lc["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    window = lc.get("sliding_window") if backbone == "mistral" else None
    if window:
        lc["max_position_embeddings"] = min(int(lc["max_position_embeddings"]), int(window))
    lc["model_type"] = "llama"
    return lc, backbone


def parse_config(raw: dict[str, Any], model_dir: Path) -> LlavaConfig:
    archs = raw.get("architectures") or []
    kind = raw.get("model_type")
    if kind not in (LLAVA, LLAVA_NEXT):
        kind = LLAVA_NEXT if "LlavaNextForConditionalGeneration" in archs else LLAVA
    vision = parse_vision(raw)
    lc, backbone = _llm_section(raw)
    llm = parse_llm_config(lc, "config.json text_config")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy {strategy!r} is not one of 'default', 'full'")
    cfg = LlavaConfig(
        kind=kind, vision=vision, llm=llm,
        image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", 32000))),
        select_strategy=strategy, projector_act=str(raw.get("projector_hidden_act", "gelu")),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)),
        pinpoints=[[int(h), int(w)] for h, w in raw.get("image_grid_pinpoints") or DEFAULT_PINPOINTS]
        if kind == LLAVA_NEXT else [],
        image_newline=kind == LLAVA_NEXT and bool(raw.get("use_image_newline_parameter", True)),
        backbone=backbone,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float16"),
    )
    if cfg.projector_act not in ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu", "relu"):
        raise ConfigError(f"projector_hidden_act {cfg.projector_act!r} is not supported")
    _read_preprocessor(cfg, model_dir)
    _read_template(cfg, model_dir)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = read_json(gen).get("eos_token_id")
        cfg.generation_eos = [int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    return cfg


def _read_preprocessor(cfg: LlavaConfig, model_dir: Path) -> None:
    v = cfg.vision
    cfg.shortest_edge, cfg.crop = v.image_size, (v.image_size, v.image_size)
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return
    pp = read_json(path)
    size = pp.get("size")
    if isinstance(size, dict) and size.get("shortest_edge"):
        cfg.shortest_edge = int(size["shortest_edge"])
    elif isinstance(size, dict) and size.get("height"):
        cfg.shortest_edge = min(int(size["height"]), int(size["width"]))
    elif isinstance(size, int):
        cfg.shortest_edge = size
    crop = pp.get("crop_size")
    if isinstance(crop, dict) and crop.get("height"):
        cfg.crop = (int(crop["height"]), int(crop["width"]))
    elif isinstance(crop, int):
        cfg.crop = (crop, crop)
    cfg.do_center_crop = bool(pp.get("do_center_crop", True))
    cfg.do_pad = cfg.kind == LLAVA and bool(pp.get("do_pad", False))
    cfg.resample = int(pp.get("resample", 3))
    cfg.image_mean = tuple(float(x) for x in pp.get("image_mean") or CLIP_MEAN)
    cfg.image_std = tuple(float(x) for x in pp.get("image_std") or CLIP_STD)
    cfg.rescale_factor = float(pp.get("rescale_factor", 1 / 255))
    if cfg.kind == LLAVA_NEXT and pp.get("image_grid_pinpoints"):
        cfg.pinpoints = [[int(h), int(w)] for h, w in pp["image_grid_pinpoints"]]
    side = cfg.crop if cfg.do_center_crop else (cfg.shortest_edge, cfg.shortest_edge)
    if side != (v.image_size, v.image_size) or (cfg.kind == LLAVA_NEXT and cfg.shortest_edge != v.image_size):
        raise ConfigError(f"preprocessor_config.json gives {side[0]}x{side[1]} tiles but the vision tower takes "
                          f"{v.image_size}x{v.image_size}")


def _read_template(cfg: LlavaConfig, model_dir: Path) -> None:
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            tpl = read_json(path).get("chat_template")
            if isinstance(tpl, str) and tpl:
                cfg.chat_template = tpl
                return
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        cfg.chat_template = jinja.read_text(encoding="utf-8")


def load_config(model_dir: str | os.PathLike) -> LlavaConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no config.json; is it a checkpoint directory?")
    return parse_config(read_json(path), model_dir)
