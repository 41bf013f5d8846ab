#!/usr/bin/env python
"""Write a random-weight checkpoint of any supported family (no transformers dependency).

    --family internvl      InternVL (2, 2.5, 3): everything after --family is
                           scripts/make_tiny_internvl.py's command line, unchanged
    --family qwen2_vl      Qwen2-VL   (Qwen2VLForConditionalGeneration)
    --family qwen2_5_vl    Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)

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

FAMILIES = ("internvl", "qwen2_vl", "qwen2_5_vl")
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
    for i in range(d.layers):
        p = f"model.layers.{i}."
        out += [
            Canon(p + "self_attn.q_proj.weight", (d.heads * hd, h), "linear"),
            Canon(p + "self_attn.q_proj.bias", (d.heads * hd,), "bias"),
            Canon(p + "self_attn.k_proj.weight", (d.kv_heads * hd, h), "linear"),
            Canon(p + "self_attn.k_proj.bias", (d.kv_heads * hd,), "bias"),
            Canon(p + "self_attn.v_proj.weight", (d.kv_heads * hd, h), "linear"),
            Canon(p + "self_attn.v_proj.bias", (d.kv_heads * hd,), "bias"),
            Canon(p + "self_attn.o_proj.weight", (h, d.heads * hd), "linear"),
            Canon(p + "mlp.gate_proj.weight", (d.mlp, h), "linear"),
            Canon(p + "mlp.up_proj.weight", (d.mlp, h), "linear"),
            Canon(p + "mlp.down_proj.weight", (h, d.mlp), "linear"),
            Canon(p + "input_layernorm.weight", (h,), "norm"),
            Canon(p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
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


def make_checkpoint(out_dir: str, family: str = "internvl", **kw) -> str:
    """One entry point for every family: InternVL takes make_tiny_internvl's keywords."""
    if family == "internvl":
        return internvl_generator().make_checkpoint(out_dir, **kw)
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
