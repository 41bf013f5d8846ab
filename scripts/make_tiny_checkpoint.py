#!/usr/bin/env python
"""Write a random-weight checkpoint of any supported family (no transformers dependency).

    --family internvl      InternVL (2, 2.5, 3): everything after --family is
                           scripts/make_tiny_internvl.py's command line, unchanged
    --family qwen2_vl      Qwen2-VL   (Qwen2VLForConditionalGeneration)
    --family qwen2_5_vl    Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)
    --family llava         LLaVA-1.5  (LlavaForConditionalGeneration, as llava-hf/llava-1.5-7b-hf)
    --family llava_next    LLaVA-NeXT (LlavaNextForConditionalGeneration, as llava-hf/llava-v1.6-*-hf)

LLaVA checkpoints (`--backbone vicuna|mistral`) are written in the llava-hf layout: a config.json
with sparse `text_config` / `vision_config` (class defaults filled by the loader), a CLIP
ViT-L/336 geometry (336 px, 14 px patches: 576 tokens per tile) at tiny widths, the llava-hf
preprocessor_config.json / processor_config.json / chat_template.json, and safetensors named
`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.weight` (`--key-style v5`: `model.vision_tower.*`, …, `lm_head.weight`).
The tokenizer is byte-level BPE with the LLaMA specials (`<unk>` 0, `<s>` 1, `</s>` 2, BOS added)
and `<image>` 32000, `<pad>` 32001 as added tokens, vocabulary 32064, as the real ones.

Qwen2-VL / Qwen2.5-VL checkpoints are written as the hub's are (transformers 4.45–4.49 saves):
a flat `config.json` whose `vision_config` is sparse (the loader must fill the class defaults),
`rope_scaling: {"type": "mrope", "mrope_section": …}`, `preprocessor_config.json` with
min_pixels / max_pixels, `generation_config.json`, `chat_template.json` (the model's own
template, default system prompt included), and sharded safetensors named `visual.*` +
`model.layers.*` (`--key-style v5`: the newer `model.visual.*` + `model.language_model.*`).
The tokenizer is a synthetic byte-level BPE with the real Qwen2 special-token ids
(`<|vision_start|>` 151652, `<|image_pad|>` 151655, `<|im_end|>` 151645, …) and the real
vocabulary size, so ids and prompts behave as the real ones. Small sizes (tiny, 2b, 3b) tie the
embeddings, as the real 2B/3B do (no `lm_head.weight` on disk).

Sizes: tiny (CPU tests); `--size 2b/7b` (Qwen2-VL) and `3b/7b` (Qwen2.5-VL) have the real shapes,
for GPU benchmarks (`--device cuda` draws them much faster).

Example::

    python scripts/make_tiny_checkpoint.py --family qwen2_5_vl --out /tmp/tiny-qwen25vl
    python scripts/make_tiny_checkpoint.py --family internvl --out /tmp/tiny --layout hf
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIES = ("internvl", "qwen2_vl", "qwen2_5_vl", "llava", "llava_next")
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
SIZES = {"qwen2_vl": ("tiny", "2b", "7b"), "qwen2_5_vl": ("tiny", "3b", "7b")}

# The real token ids (both families).
IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
       "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656}
MIN_PIXELS = 56 * 56  # every hub preprocessor_config.json
MAX_PIXELS = 28 * 28 * 16384
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The model's chat_template.json (identical for Qwen2-VL and Qwen2.5-VL).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def internvl_generator():
    """scripts/make_tiny_internvl.py as a module (its writer, tokenizer and tensor helpers)."""
    mod = sys.modules.get("make_tiny_internvl")
    if mod is None:
        path = Path(__file__).resolve().parent / "make_tiny_internvl.py"
        spec = importlib.util.spec_from_file_location("make_tiny_internvl", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["make_tiny_internvl"] = mod
        spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- dims


@dataclass(frozen=True)
class QwenVLDims:
    family: str  # qwen2_vl | qwen2_5_vl
    # LLM
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    tied: bool
    mrope_section: tuple[int, int, int]
    max_positions: int
    # ViT
    vit_depth: int
    vit_width: int
    vit_heads: int
    vit_mlp: int
    fullatt: tuple[int, ...] = ()  # Qwen2.5-VL

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


_LLM = {  # hidden, layers, heads, kv_heads, mlp, vocab, tied
    "tiny": (64, 2, 4, 2, 128, 151936, True),
    "2b": (1536, 28, 12, 2, 8960, 151936, True),
    "3b": (2048, 36, 16, 2, 11008, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
}


def qwen_dims(family: str, size: str, tie_word_embeddings: bool | None = None) -> QwenVLDims:
    if family not in SIZES or size not in SIZES[family]:
        raise ValueError(f"unknown {family} size {size!r}; choose from {SIZES.get(family)}")
    hidden, layers, heads, kv, mlp, vocab, tied = _LLM[size]
    tiny = size == "tiny"
    section = (2, 3, 3) if tiny else (16, 24, 24)
    if family == "qwen2_vl":
        vit = (2, 32, 4, 128) if tiny else (32, 1280, 16, 5120)
        fullatt: tuple[int, ...] = ()
        max_pos = 32768
    else:
        vit = (3, 32, 4, 48) if tiny else (32, 1280, 16, 3420)
        fullatt = (2,) if tiny else (7, 15, 23, 31)
        max_pos = 128000
    return QwenVLDims(family, hidden, layers, heads, kv, mlp, vocab,
                      tied if tie_word_embeddings is None else tie_word_embeddings, section, max_pos, *vit, fullatt)


# ------------------------------------------------------------- canonical tensors


def canonical_tensors(d: QwenVLDims) -> list:
    """Every tensor under its hub (legacy) name, with its shape and init."""
    Canon = internvl_generator().Canon
    c, q25 = d.vit_width, d.family == "qwen2_5_vl"
    out = [Canon("visual.patch_embed.proj.weight", (c, 3, 2, 14, 14), "linear")]
    for i in range(d.vit_depth):
        p = f"visual.blocks.{i}."
        for norm in ("norm1", "norm2"):
            out.append(Canon(f"{p}{norm}.weight", (c,), "norm"))
            if not q25:
                out.append(Canon(f"{p}{norm}.bias", (c,), "bias"))
        out += [Canon(p + "attn.qkv.weight", (3 * c, c), "linear"), Canon(p + "attn.qkv.bias", (3 * c,), "bias"),
                Canon(p + "attn.proj.weight", (c, c), "linear"), Canon(p + "attn.proj.bias", (c,), "bias")]
        if q25:
            for name, shape in (("gate_proj", (d.vit_mlp, c)), ("up_proj", (d.vit_mlp, c)),
                                ("down_proj", (c, d.vit_mlp))):
                out += [Canon(f"{p}mlp.{name}.weight", shape, "linear"), Canon(f"{p}mlp.{name}.bias", shape[:1], "bias")]
        else:
            out += [Canon(p + "mlp.fc1.weight", (d.vit_mlp, c), "linear"), Canon(p + "mlp.fc1.bias", (d.vit_mlp,), "bias"),
                    Canon(p + "mlp.fc2.weight", (c, d.vit_mlp), "linear"), Canon(p + "mlp.fc2.bias", (c,), "bias")]
    out.append(Canon("visual.merger.ln_q.weight", (c,), "norm"))
    if not q25:
        out.append(Canon("visual.merger.ln_q.bias", (c,), "bias"))
    out += [Canon("visual.merger.mlp.0.weight", (4 * c, 4 * c), "linear"),
            Canon("visual.merger.mlp.0.bias", (4 * c,), "bias"),
            Canon("visual.merger.mlp.2.weight", (d.hidden, 4 * c), "linear"),
            Canon("visual.merger.mlp.2.bias", (d.hidden,), "bias")]
    h, hd = d.hidden, d.head_dim
    # Tied: the embeddings are also the LM head, drawn as one (std 1/sqrt(hidden): logits of std ~1,
    # clear top-1 margins, as the untied head gives)
    out.append(Canon("model.embed_tokens.weight", (d.vocab, h), "linear" if d.tied else "embed"))
    layer = internvl_generator().decoder_layer_canons
    for i in range(d.layers):
        out += layer(f"model.layers.{i}.", d.heads, d.kv_heads, hd, h, d.mlp, qkv_bias=True)
    out.append(Canon("model.norm.weight", (h,), "norm"))
    if not d.tied:
        out.append(Canon("lm_head.weight", (d.vocab, h), "linear"))
    return out


def v5_key(legacy: str) -> str:
    """Hub key -> the name transformers >= 4.52 keeps in memory (and some fine-tunes saved)."""
    if legacy.startswith("visual."):
        return "model." + legacy
    if legacy.startswith("model."):
        return "model.language_model." + legacy[len("model."):]
    return legacy  # lm_head.weight


def layout(canons: list, key_style: str) -> list:
    if key_style not in ("legacy", "v5"):
        raise ValueError(f"unknown key style {key_style!r}")
    OutTensor = internvl_generator().OutTensor
    rename = v5_key if key_style == "v5" else (lambda k: k)
    return [OutTensor(rename(c.name), c.shape, c.name) for c in canons]


# ---------------------------------------------------------------------- configs


def vision_config(d: QwenVLDims) -> dict:
    """Sparse, as on the hub: keys at their class default are left out (the loader fills them)."""
    if d.family == "qwen2_vl":
        vc = {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}
        if d.hidden != 3584:  # the merger's output: the class default is 7B's width
            vc["hidden_size"] = d.hidden
        if d.vit_depth != 32:
            vc.update(depth=d.vit_depth, embed_dim=d.vit_width, num_heads=d.vit_heads,
                      mlp_ratio=d.vit_mlp // d.vit_width)
        return vc
    vc = {"hidden_size": d.vit_width, "in_chans": 3, "model_type": "qwen2_5_vl", "out_hidden_size": d.hidden,
          "spatial_patch_size": 14, "tokens_per_second": 2}
    if d.vit_depth != 32:
        vc.update(depth=d.vit_depth, num_heads=d.vit_heads, intermediate_size=d.vit_mlp,
                  fullatt_block_indexes=list(d.fullatt))
    return vc


def config(d: QwenVLDims, dtype: str) -> dict:
    """The flat hub-style config.json (loads in transformers 4.45+ and 5.x)."""
    return {
        "architectures": [ARCHITECTURES[d.family]],
        "model_type": d.family,
        "attention_dropout": 0.0,
        **IDS,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.mlp,
        "max_position_embeddings": d.max_positions,
        "max_window_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": d.tied,
        "torch_dtype": dtype,
        "transformers_version": "4.49.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": vision_config(d),
        "rope_scaling": {"type": "mrope", "mrope_section": list(d.mrope_section)},
        "vocab_size": d.vocab,
    }


def preprocessor_config(family: str, min_pixels: int, max_pixels: int) -> dict:
    return {
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": PROCESSORS[family],
    }


def generation_config() -> dict:
    # The Instruct checkpoints add near-greedy sampling defaults (top_k 1, repetition_penalty
    # 1.05); they are left out so that a plain request is plain greedy.
    return {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643]}


def write_tokenizer(out: Path, vocab: int) -> None:
    mk = internvl_generator()
    mk.build_tokenizer("qwen2_vl", vocab).save(str(out / "tokenizer.json"))
    mk._write_json(out / "tokenizer_config.json", {**mk.tokenizer_config("qwen2_vl"), "chat_template": CHAT_TEMPLATE})
    mk._write_json(out / "special_tokens_map.json", mk.special_tokens_map("qwen2_vl"))
    mk._write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})


# --------------------------------------------------------------------------- main


def make_qwen_vl(out_dir: str, family: str = "qwen2_vl", size: str = "tiny", seed: int = 0, dtype: str = "float32",
                 key_style: str = "legacy", tie_word_embeddings: bool | None = None, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, shard_bytes: int | None = None, device: str = "cpu") -> str:
    """Write a random-weight Qwen2-VL / Qwen2.5-VL checkpoint into `out_dir` and return it."""
    mk = internvl_generator()
    if dtype not in mk.DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    d = qwen_dims(family, size, tie_word_embeddings)
    torch_dtype = mk.DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    canons = canonical_tensors(d)
    tensors = layout(canons, key_style)
    if shard_bytes is None:
        total = sum(mk._nbytes(x.shape, torch_dtype) for x in tensors)
        shard_bytes = total // 2 if size == "tiny" else mk.BIG_SHARD_BYTES  # tiny: still >= 2 shards
    mk.write_weights(out, tensors, canons, seed, torch_dtype, shard_bytes, progress=size != "tiny", device=device)
    mk._write_json(out / "config.json", config(d, dtype))
    mk._write_json(out / "preprocessor_config.json", preprocessor_config(family, min_pixels, max_pixels))
    mk._write_json(out / "generation_config.json", generation_config())
    write_tokenizer(out, d.vocab)
    args = ["python", "scripts/make_tiny_checkpoint.py", "--family", family, "--out", out_dir, "--size", size,
            "--seed", str(seed), "--dtype", dtype, "--key-style", key_style, "--min-pixels", str(min_pixels),
            "--max-pixels", str(max_pixels)]
    if tie_word_embeddings is not None:
        args += ["--tie-word-embeddings", str(tie_word_embeddings).lower()]
    (out / "README.md").write_text(
        f"# Random-weight {ARCHITECTURES[family]} checkpoint\n\n"
        "RANDOM weights and a synthetic byte-level tokenizer (real special-token ids): for testing\n"
        "loaders and serving code only; its outputs are meaningless.\n\n"
        f"Made with:\n\n```\n{shlex.join(args)}\n```\n", encoding="utf-8")
    return out_dir


# --------------------------------------------------------------------------- LLaVA

LLAVA_ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
LLAVA_BACKBONES = ("vicuna", "mistral")
LLAVA_IMAGE_ID, LLAVA_PAD_ID, LLAVA_VOCAB = 32000, 32001, 32064
LLAVA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# llava-hf/llava-1.5-7b-hf's chat_template.json (also the vicuna LLaVA-NeXT's "USER: … ASSISTANT:" form)
LLAVA_VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf's: Mistral [INST] turns, images first in a turn
LLAVA_MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ ' ' + content['text'] + '</s>' }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class LlavaDims:
    family: str  # llava | llava_next
    backbone: str  # vicuna (LLaMA) | mistral
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    mlp: int = 128
    vocab: int = LLAVA_VOCAB
    vit_width: int = 32
    vit_layers: int = 3  # vision_feature_layer -2: the last one is not used
    vit_heads: int = 4
    vit_mlp: int = 64
    image_size: int = 336
    patch: int = 14

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def llava_dims(family: str, backbone: str) -> LlavaDims:
    if family not in LLAVA_ARCHITECTURES or backbone not in LLAVA_BACKBONES:
        raise ValueError(f"unknown LLaVA family {family!r} / backbone {backbone!r}")
    return LlavaDims(family, backbone, kv_heads=2 if backbone == "mistral" else 4)


def llava_canons(d: LlavaDims) -> list:
    """Every tensor under its llava-hf (legacy) name."""
    Canon = internvl_generator().Canon
    c, v = d.vit_width, "vision_tower.vision_model."
    n_pos = (d.image_size // d.patch) ** 2 + 1
    out = [Canon(v + "embeddings.class_embedding", (c,), "embed"),
           Canon(v + "embeddings.patch_embedding.weight", (c, 3, d.patch, d.patch), "linear"),
           Canon(v + "embeddings.position_embedding.weight", (n_pos, c), "embed"),
           Canon(v + "pre_layrnorm.weight", (c,), "norm"), Canon(v + "pre_layrnorm.bias", (c,), "bias")]
    for i in range(d.vit_layers):
        p = f"{v}encoder.layers.{i}."
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out += [Canon(f"{p}self_attn.{name}.weight", (c, c), "linear"), Canon(f"{p}self_attn.{name}.bias", (c,), "bias")]
        out += [Canon(p + "layer_norm1.weight", (c,), "norm"), Canon(p + "layer_norm1.bias", (c,), "bias"),
                Canon(p + "mlp.fc1.weight", (d.vit_mlp, c), "linear"), Canon(p + "mlp.fc1.bias", (d.vit_mlp,), "bias"),
                Canon(p + "mlp.fc2.weight", (c, d.vit_mlp), "linear"), Canon(p + "mlp.fc2.bias", (c,), "bias"),
                Canon(p + "layer_norm2.weight", (c,), "norm"), Canon(p + "layer_norm2.bias", (c,), "bias")]
    out += [Canon(v + "post_layernorm.weight", (c,), "norm"), Canon(v + "post_layernorm.bias", (c,), "bias")]
    h, hd = d.hidden, d.head_dim
    out += [Canon("multi_modal_projector.linear_1.weight", (h, c), "linear"),
            Canon("multi_modal_projector.linear_1.bias", (h,), "bias"),
            Canon("multi_modal_projector.linear_2.weight", (h, h), "linear"),
            Canon("multi_modal_projector.linear_2.bias", (h,), "bias")]
    if d.family == "llava_next":
        out.append(Canon("image_newline", (h,), "embed"))
    p0 = "language_model.model."
    out.append(Canon(p0 + "embed_tokens.weight", (d.vocab, h), "embed"))
    layer = internvl_generator().decoder_layer_canons
    for i in range(d.layers):
        out += layer(f"{p0}layers.{i}.", d.heads, d.kv_heads, hd, h, d.mlp, qkv_bias=False)
    out += [Canon(p0 + "norm.weight", (h,), "norm"), Canon("language_model.lm_head.weight", (d.vocab, h), "linear")]
    return out


def llava_v5_key(legacy: str) -> str:
    """llava-hf key -> the name transformers >= 4.52 keeps in memory (and saves)."""
    if legacy == "language_model.lm_head.weight":
        return "lm_head.weight"
    if legacy.startswith("language_model.model."):
        return "model.language_model." + legacy[len("language_model.model."):]
    return "model." + legacy


def llava_config(d: LlavaDims, dtype: str) -> dict:
    """llava-hf's config.json: sparse sections (the class defaults fill the rest)."""
    if d.backbone == "mistral":
        text = {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
                "model_type": "mistral", "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                "sliding_window": None}
    else:
        text = {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                "model_type": "llama", "max_position_embeddings": 4096}
    text.update(hidden_size=d.hidden, intermediate_size=d.mlp, num_hidden_layers=d.layers,
                num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, rms_norm_eps=1e-5, torch_dtype=dtype,
                vocab_size=d.vocab)
    cfg = {
        "architectures": [LLAVA_ARCHITECTURES[d.family]],
        "ignore_index": -100,
        "image_token_index": LLAVA_IMAGE_ID,
        "model_type": d.family,
        "pad_token_id": LLAVA_PAD_ID,
        "projector_hidden_act": "gelu",
        "text_config": text,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.39.0.dev0",
        "vision_config": {"hidden_size": d.vit_width, "image_size": d.image_size, "intermediate_size": d.vit_mlp,
                          "model_type": "clip_vision_model", "num_attention_heads": d.vit_heads,
                          "num_hidden_layers": d.vit_layers, "patch_size": d.patch, "projection_dim": 768,
                          "vocab_size": 32000},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": d.vocab,
    }
    if d.family == "llava_next":
        cfg["image_grid_pinpoints"] = LLAVA_PINPOINTS
        cfg["use_image_newline_parameter"] = True
    return cfg


def llava_preprocessor_config(d: LlavaDims, pad: bool) -> dict:
    pp = {"crop_size": {"height": d.image_size, "width": d.image_size}, "do_center_crop": True,
          "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
          "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3, "rescale_factor": 1 / 255,
          "size": {"shortest_edge": d.image_size}}
    if d.family == "llava_next":
        pp.update(aspect_ratio_setting="anyres", image_grid_pinpoints=LLAVA_PINPOINTS,
                  image_processor_type="LlavaNextImageProcessor", processor_class="LlavaNextProcessor")
    elif pad:  # LlavaImageProcessor: pad to a square (CLIP mean) before the resize
        pp.update(do_pad=True, image_processor_type="LlavaImageProcessor", processor_class="LlavaProcessor")
    else:
        pp.update(image_processor_type="CLIPImageProcessor", processor_class="LlavaProcessor")
    return pp


def llava_vocab() -> tuple[dict[str, int], list]:
    """LLaMA ids: <unk> <s> </s>, bytes, merges, fillers to 32064; <image> 32000, <pad> 32001."""
    mk = internvl_generator()
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": LLAVA_IMAGE_ID, "<pad>": LLAVA_PAD_ID}
    vocab, taken, next_id = dict(specials), set(specials.values()), 0
    symbols = mk._byte_symbols()
    merges = mk.learn_merges(mk.MERGE_CORPUS)
    fillers = mk._filler_tokens(symbols)

    def add(token: str) -> None:
        nonlocal next_id
        if token in vocab:
            return
        while next_id in taken:
            next_id += 1
        vocab[token] = next_id
        taken.add(next_id)

    for tok in [*symbols, *(a + b for a, b in merges)]:
        add(tok)
    while len(vocab) < LLAVA_VOCAB:
        add(next(fillers))
    assert sorted(vocab.values()) == list(range(LLAVA_VOCAB))
    return vocab, merges


def write_llava_tokenizer(out: Path, template: str) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    mk = internvl_generator()
    vocab, merges = llava_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    decoder = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True} for t in specials}
    roles = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    mk._write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder, **roles,
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
        "clean_up_tokenization_spaces": False, "chat_template": template})
    mk._write_json(out / "special_tokens_map.json", {**roles, "additional_special_tokens": ["<image>"]})
    mk._write_json(out / "chat_template.json", {"chat_template": template})


def make_llava(out_dir: str, family: str = "llava", backbone: str = "vicuna", seed: int = 0, dtype: str = "float32",
               key_style: str = "legacy", pad: bool = False, shard_bytes: int | None = None,
               device: str = "cpu") -> str:
    """Write a random-weight tiny LLaVA-1.5 / LLaVA-NeXT checkpoint into `out_dir` and return it."""
    mk = internvl_generator()
    if dtype not in mk.DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if key_style not in ("legacy", "v5"):
        raise ValueError(f"unknown key style {key_style!r}")
    d = llava_dims(family, backbone)
    torch_dtype = mk.DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    canons = llava_canons(d)
    rename = llava_v5_key if key_style == "v5" else (lambda k: k)
    tensors = [mk.OutTensor(rename(c.name), c.shape, c.name) for c in canons]
    if shard_bytes is None:
        shard_bytes = sum(mk._nbytes(x.shape, torch_dtype) for x in tensors) // 2  # >= 2 shards
    mk.write_weights(out, tensors, canons, seed, torch_dtype, shard_bytes, progress=False, device=device)
    mk._write_json(out / "config.json", llava_config(d, dtype))
    mk._write_json(out / "preprocessor_config.json", llava_preprocessor_config(d, pad))
    mk._write_json(out / "processor_config.json", {
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": d.patch,
        "processor_class": "LlavaNextProcessor" if family == "llava_next" else "LlavaProcessor",
        "vision_feature_select_strategy": "default"})
    mk._write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": LLAVA_PAD_ID})
    write_llava_tokenizer(out, LLAVA_MISTRAL_TEMPLATE if backbone == "mistral" else LLAVA_VICUNA_TEMPLATE)
    args = ["python", "scripts/make_tiny_checkpoint.py", "--family", family, "--out", out_dir, "--backbone", backbone,
            "--seed", str(seed), "--dtype", dtype, "--key-style", key_style] + (["--pad"] if pad else [])
    (out / "README.md").write_text(
        f"# Random-weight {LLAVA_ARCHITECTURES[family]} checkpoint ({backbone})\n\n"
        "RANDOM weights and a synthetic byte-level tokenizer (real special-token ids): for testing\n"
        "loaders and serving code only; its outputs are meaningless.\n\n"
        f"Made with:\n\n```\n{shlex.join(args)}\n```\n", encoding="utf-8")
    return out_dir


def llava_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Write a random-weight tiny LLaVA-1.5 / LLaVA-NeXT checkpoint")
    p.add_argument("--family", choices=tuple(LLAVA_ARCHITECTURES), required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--backbone", choices=LLAVA_BACKBONES, default="vicuna")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--key-style", choices=["legacy", "v5"], default="legacy",
                   help="legacy: language_model.model.* (llava-hf); v5: model.language_model.* + lm_head.weight")
    p.add_argument("--pad", action="store_true", help="LLaVA-1.5: pad to a square instead of the center crop")
    p.add_argument("--shard-bytes", type=int, default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    print(f"wrote {make_llava(a.out, a.family, a.backbone, a.seed, a.dtype, a.key_style, a.pad, a.shard_bytes, a.device)}")
    return 0


def make_checkpoint(out_dir: str, family: str = "internvl", **kw) -> str:
    """One entry point for every family: InternVL takes make_tiny_internvl's keywords."""
    if family == "internvl":
        return internvl_generator().make_checkpoint(out_dir, **kw)
    if family in LLAVA_ARCHITECTURES:
        return make_llava(out_dir, family=family, **kw)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return make_qwen_vl(out_dir, family=family, **kw)


def _bool(s: str) -> bool:
    if s.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError("expected true or false")
    return s.lower() == "true"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--family", choices=FAMILIES, default="internvl")
    known, rest = first.parse_known_args(argv)
    if known.family == "internvl":
        return internvl_generator().main(rest)
    if known.family in LLAVA_ARCHITECTURES:
        return llava_main(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=FAMILIES, default="internvl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", choices=SIZES[known.family], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--key-style", choices=["legacy", "v5"], default="legacy",
                   help="legacy: visual.* + model.layers.* (the hub); v5: model.visual.* + model.language_model.*")
    p.add_argument("--tie-word-embeddings", type=_bool, default=None,
                   help="true/false; default: tied for tiny, 2b and 3b, as the real ones")
    p.add_argument("--min-pixels", type=int, default=MIN_PIXELS)
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    p.add_argument("--shard-bytes", type=int, default=None, help="max bytes per safetensors shard")
    p.add_argument("--device", default="cpu", help="where to draw the random values (cuda: fast, other values)")
    a = p.parse_args(argv)
    out = make_qwen_vl(a.out, family=a.family, size=a.size, seed=a.seed, dtype=a.dtype, key_style=a.key_style,
                       tie_word_embeddings=a.tie_word_embeddings, min_pixels=a.min_pixels, max_pixels=a.max_pixels,
                       shard_bytes=a.shard_bytes, device=a.device)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
