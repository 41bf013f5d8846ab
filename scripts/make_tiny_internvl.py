#!/usr/bin/env python
"""Write a random-weight InternVL checkpoint (no transformers dependency).

Two on-disk layouts are supported:

* ``original`` -- the OpenGVLab remote-code layout (``InternVLChatModel``,
  fused ``attn.qkv`` in the ViT, InternLM2's grouped ``wqkv``).
* ``hf`` -- the transformers layout (``InternVLForConditionalGeneration``), with
  InternLM2 converted to Llama.

Weights are generated as one *canonical* set of tensors (named as in the
original layout, each from its own seeded generator) and then renamed / split
per layout, so the same seed gives numerically identical models in both.
Matrices use std 1/sqrt(fan_in) (close to 0.02 at real widths) so every layer,
the ViT's included, moves the logits of even the 64-wide tiny model; norms are
~1, layer scales ~0.1, biases small noise, embeddings std 0.02.

The tokenizer is a synthetic byte-level BPE with the real special-token ids,
so prompts, image placeholders and stop tokens behave like the real ones.

Example::

    python scripts/make_tiny_internvl.py --out /tmp/tiny --layout hf --llm qwen2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_SIZE = 448
PATCH_SIZE = 14
NUM_POSITIONS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1  # 1024 patches + CLS
DOWNSAMPLE_RATIO = 0.5
IMAGE_SEQ_LENGTH = int((IMAGE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO**2)  # 256
BIG_SHARD_BYTES = 5 * 1000**3
MODEL_MAX_LENGTH = 32768


# --------------------------------------------------------------------------- dims


@dataclass(frozen=True)
class VitDims:
    hidden: int
    layers: int
    heads: int
    mlp: int
    qkv_bias: bool
    qk_norm: bool
    norm_type: str  # "layer_norm" | "rms_norm"


@dataclass(frozen=True)
class LlmDims:
    kind: str  # "qwen2" | "internlm2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def rms_eps(self) -> float:
        return 1e-6 if self.kind == "qwen2" else 1e-5


QWEN2_VOCAB = 151674
INTERNLM2_VOCAB = 92553

# (size, llm) -> hidden, layers, heads, kv_heads, mlp
LLM_SHAPES: dict[tuple[str, str], tuple[int, int, int, int, int]] = {
    ("tiny", "qwen2"): (64, 2, 4, 2, 128),
    ("tiny", "internlm2"): (64, 2, 4, 2, 128),
    ("1b", "qwen2"): (896, 24, 14, 2, 4864),  # InternVL2.5-1B
    ("1b", "internlm2"): (896, 24, 14, 2, 4864),
    ("2b", "qwen2"): (1536, 28, 12, 2, 8960),  # InternVL3-2B
    ("2b", "internlm2"): (2048, 24, 16, 8, 8192),  # InternVL2-2B
    ("8b", "qwen2"): (3584, 28, 28, 4, 18944),  # InternVL3-8B
    ("8b", "internlm2"): (4096, 32, 32, 8, 14336),  # InternVL2-8B
}


def vit_dims(size: str, vit: str) -> VitDims:
    if vit not in ("300m", "6b"):
        raise ValueError(f"unknown vit {vit!r}")
    six_b = vit == "6b"
    if size == "tiny":
        hidden, layers, heads, mlp = 64, 2, 4, 128
    elif six_b:
        hidden, layers, heads, mlp = 3200, 45, 25, 12800
    else:
        hidden, layers, heads, mlp = 1024, 24, 16, 4096
    return VitDims(
        hidden=hidden,
        layers=layers,
        heads=heads,
        mlp=mlp,
        qkv_bias=not six_b,
        qk_norm=six_b,
        norm_type="rms_norm" if six_b else "layer_norm",
    )


def llm_dims(size: str, llm: str) -> LlmDims:
    if (size, llm) not in LLM_SHAPES:
        raise ValueError(f"unknown size/llm combination {size!r}/{llm!r}")
    hidden, layers, heads, kv_heads, mlp = LLM_SHAPES[(size, llm)]
    vocab = QWEN2_VOCAB if llm == "qwen2" else INTERNLM2_VOCAB
    return LlmDims(llm, hidden, layers, heads, kv_heads, mlp, vocab)


# ------------------------------------------------------------- canonical tensors


@dataclass(frozen=True)
class Canon:
    """A canonical tensor: original-layout name, shape and how to initialise it."""

    name: str
    shape: tuple[int, ...]
    init: str  # "linear" | "embed" | "bias" | "norm" | "scale"


def _vit_canons(v: VitDims) -> list[Canon]:
    c, p = v.hidden, "vision_model."
    out = [
        Canon(p + "embeddings.class_embedding", (1, 1, c), "embed"),
        Canon(p + "embeddings.patch_embedding.weight", (c, 3, PATCH_SIZE, PATCH_SIZE), "linear"),
        Canon(p + "embeddings.patch_embedding.bias", (c,), "bias"),
        Canon(p + "embeddings.position_embedding", (1, NUM_POSITIONS, c), "embed"),
    ]
    for i in range(v.layers):
        lp = f"{p}encoder.layers.{i}."
        out.append(Canon(lp + "attn.qkv.weight", (3 * c, c), "linear"))
        if v.qkv_bias:
            out.append(Canon(lp + "attn.qkv.bias", (3 * c,), "bias"))
        if v.qk_norm:
            out += [Canon(lp + "attn.q_norm.weight", (c,), "norm"), Canon(lp + "attn.k_norm.weight", (c,), "norm")]
        out += [
            Canon(lp + "attn.proj.weight", (c, c), "linear"),
            Canon(lp + "attn.proj.bias", (c,), "bias"),
            Canon(lp + "mlp.fc1.weight", (v.mlp, c), "linear"),
            Canon(lp + "mlp.fc1.bias", (v.mlp,), "bias"),
            Canon(lp + "mlp.fc2.weight", (c, v.mlp), "linear"),
            Canon(lp + "mlp.fc2.bias", (c,), "bias"),
        ]
        for norm in ("norm1", "norm2"):
            out.append(Canon(f"{lp}{norm}.weight", (c,), "norm"))
            if v.norm_type == "layer_norm":
                out.append(Canon(f"{lp}{norm}.bias", (c,), "bias"))
        out += [Canon(lp + "ls1", (c,), "scale"), Canon(lp + "ls2", (c,), "scale")]
    return out


def _projector_canons(v: VitDims, t: LlmDims) -> list[Canon]:
    c4, h = 4 * v.hidden, t.hidden
    return [
        Canon("mlp1.0.weight", (c4,), "norm"),
        Canon("mlp1.0.bias", (c4,), "bias"),
        Canon("mlp1.1.weight", (h, c4), "linear"),
        Canon("mlp1.1.bias", (h,), "bias"),
        Canon("mlp1.3.weight", (h, h), "linear"),
        Canon("mlp1.3.bias", (h,), "bias"),
    ]


def decoder_layer_canons(lp: str, heads: int, kv_heads: int, head_dim: int, hidden: int, mlp: int,
                         qkv_bias: bool) -> list[Canon]:
    """One LLaMA / Qwen2-style decoder layer's tensors under prefix `lp` (hub names), in the
    order the generator draws them (the order fixes the random values)."""
    out = []
    for name, rows in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
        out.append(Canon(f"{lp}self_attn.{name}.weight", (rows * head_dim, hidden), "linear"))
        if qkv_bias:
            out.append(Canon(f"{lp}self_attn.{name}.bias", (rows * head_dim,), "bias"))
    return out + [
        Canon(lp + "self_attn.o_proj.weight", (hidden, heads * head_dim), "linear"),
        Canon(lp + "mlp.gate_proj.weight", (mlp, hidden), "linear"),
        Canon(lp + "mlp.up_proj.weight", (mlp, hidden), "linear"),
        Canon(lp + "mlp.down_proj.weight", (hidden, mlp), "linear"),
        Canon(lp + "input_layernorm.weight", (hidden,), "norm"),
        Canon(lp + "post_attention_layernorm.weight", (hidden,), "norm"),
    ]


def _qwen2_canons(t: LlmDims) -> list[Canon]:
    h, hd, p = t.hidden, t.head_dim, "language_model.model."
    out = [Canon(p + "embed_tokens.weight", (t.vocab, h), "embed")]
    for i in range(t.layers):
        out += decoder_layer_canons(f"{p}layers.{i}.", t.heads, t.kv_heads, hd, h, t.mlp, qkv_bias=True)
    out += [
        Canon(p + "norm.weight", (h,), "norm"),
        Canon("language_model.lm_head.weight", (t.vocab, h), "linear"),
    ]
    return out


def _internlm2_canons(t: LlmDims) -> list[Canon]:
    h, hd, p = t.hidden, t.head_dim, "language_model.model."
    out = [Canon(p + "tok_embeddings.weight", (t.vocab, h), "embed")]
    for i in range(t.layers):
        lp = f"{p}layers.{i}."
        out += [
            Canon(lp + "attention.wqkv.weight", ((t.heads + 2 * t.kv_heads) * hd, h), "linear"),
            Canon(lp + "attention.wo.weight", (h, t.heads * hd), "linear"),
            Canon(lp + "feed_forward.w1.weight", (t.mlp, h), "linear"),
            Canon(lp + "feed_forward.w3.weight", (t.mlp, h), "linear"),
            Canon(lp + "feed_forward.w2.weight", (h, t.mlp), "linear"),
            Canon(lp + "attention_norm.weight", (h,), "norm"),
            Canon(lp + "ffn_norm.weight", (h,), "norm"),
        ]
    out += [
        Canon(p + "norm.weight", (h,), "norm"),
        Canon("language_model.output.weight", (t.vocab, h), "linear"),
    ]
    return out


def canonical_tensors(v: VitDims, t: LlmDims) -> list[Canon]:
    llm = _qwen2_canons(t) if t.kind == "qwen2" else _internlm2_canons(t)
    return _vit_canons(v) + _projector_canons(v, t) + llm


def _tensor_seed(seed: int, name: str) -> int:
    # Per-tensor seeds make every tensor independent of generation order, so
    # layouts can emit tensors in any order and still agree bit for bit.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generate(canon: Canon, seed: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Draw one canonical tensor directly in the target dtype (on `device`; returned there).

    Each device type has its own generator, so `--device cuda` gives other (equally
    deterministic) values than the CPU: seconds instead of minutes for the 8B size."""
    gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, canon.name))
    x = torch.empty(canon.shape, dtype=dtype, device=device)
    if canon.init == "linear":
        # std = 1/sqrt(fan_in) keeps every sublayer's output O(1) at any width, so
        # each layer (ViT included) visibly moves the logits, and the lm head gives
        # logits of std ~1 with clear top-1 margins. For real widths this is
        # 0.007..0.03, i.e. close to the usual 0.02.
        fan_in = math.prod(canon.shape[1:])
        return x.normal_(0.0, fan_in**-0.5, generator=gen)
    if canon.init == "embed":  # token / position / class embeddings
        return x.normal_(0.0, 0.02, generator=gen)
    if canon.init == "bias":  # noise breaks symmetry -> different inputs, different tokens
        return x.normal_(0.0, 0.02, generator=gen)
    if canon.init == "norm":  # ~1 keeps the residual scale; noise avoids degenerate norms
        return x.normal_(1.0, 0.05, generator=gen)
    if canon.init == "scale":  # InternViT layer scale
        return x.normal_(0.1, 0.02, generator=gen)
    raise ValueError(f"unknown init {canon.init!r}")


# ---------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class OutTensor:
    """A tensor as written to disk: derived from exactly one canonical tensor."""

    name: str
    shape: tuple[int, ...]
    source: str
    derive: Callable[[torch.Tensor], torch.Tensor] | None = None


def original_layout(canons: list[Canon]) -> list[OutTensor]:
    return [OutTensor(c.name, c.shape, c.name) for c in canons]


# Plain renames original -> hf (legacy key style); applied in order, first match wins.
_HF_RENAMES: list[tuple[str, str]] = [
    (r"^vision_model\.embeddings\.class_embedding$", "vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.embeddings\.position_embedding$", "vision_tower.embeddings.position_embeddings"),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.",
        r"vision_tower.encoder.layer.\1.attention.projection_layer.",
    ),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.", r"vision_tower.encoder.layer.\1.attention.\2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision_tower.encoder.layer.\1.mlp."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"vision_tower.encoder.layer.\1.lambda_2"),
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
    # InternLM2 -> Llama
    (r"\.tok_embeddings\.", ".embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^language_model\.output\.", "language_model.lm_head."),
]


def _rename(name: str) -> str:
    for pattern, repl in _HF_RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def _rows(start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x[start:stop].clone()


def _internlm2_qkv(t: LlmDims, part: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # wqkv rows are grouped per kv head: [kv, g + 2, head_dim, hidden] with
    # g query heads, then one k head, then one v head in every group.
    g = t.heads // t.kv_heads

    def split(w: torch.Tensor) -> torch.Tensor:
        grouped = w.view(t.kv_heads, g + 2, t.head_dim, w.shape[-1])
        sel = {"q": grouped[:, :g], "k": grouped[:, g], "v": grouped[:, g + 1]}[part]
        return sel.reshape(-1, w.shape[-1]).clone()

    return split


def _hf_split(canon: Canon, v: VitDims, t: LlmDims) -> list[OutTensor] | None:
    """Fused tensors that the hf layout stores as separate q/k/v projections."""
    vit_qkv = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", canon.name)
    if vit_qkv:
        layer, kind = vit_qkv.groups()
        c = v.hidden
        return [
            OutTensor(
                f"vision_tower.encoder.layer.{layer}.attention.{p}_proj.{kind}",
                (c,) + canon.shape[1:],
                canon.name,
                _rows(j * c, (j + 1) * c),
            )
            for j, p in enumerate("qkv")
        ]
    lm_qkv = re.match(r"^(language_model\.model\.layers\.\d+)\.attention\.wqkv\.weight$", canon.name)
    if lm_qkv:
        prefix = lm_qkv.group(1)
        heads = {"q": t.heads, "k": t.kv_heads, "v": t.kv_heads}
        return [
            OutTensor(
                f"{prefix}.self_attn.{p}_proj.weight",
                (heads[p] * t.head_dim, t.hidden),
                canon.name,
                _internlm2_qkv(t, p),
            )
            for p in "qkv"
        ]
    return None


def _v5_key(legacy: str) -> str:
    """Legacy hub key -> the key transformers 5 uses in memory."""
    if legacy.startswith("language_model.lm_head."):
        return legacy[len("language_model.") :]
    if legacy.startswith("language_model.model."):
        return "model.language_model." + legacy[len("language_model.model.") :]
    return "model." + legacy


def hf_layout(canons: list[Canon], v: VitDims, t: LlmDims, key_style: str) -> list[OutTensor]:
    if key_style not in ("legacy", "v5"):
        raise ValueError(f"unknown hf key style {key_style!r}")
    out: list[OutTensor] = []
    for canon in canons:
        entries = _hf_split(canon, v, t) or [OutTensor(_rename(canon.name), canon.shape, canon.name)]
        out += entries
    if key_style == "v5":
        out = [OutTensor(_v5_key(o.name), o.shape, o.source, o.derive) for o in out]
    return out


# ---------------------------------------------------------------------- writing


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def plan_shards(tensors: list[OutTensor], dtype: torch.dtype, shard_bytes: int) -> list[list[OutTensor]]:
    """Greedy split in order; a tensor larger than shard_bytes gets its own shard."""
    shards: list[list[OutTensor]] = [[]]
    used = 0
    for t in tensors:
        size = _nbytes(t.shape, dtype)
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += size
    return shards


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _safetensors_header(shard: list[OutTensor], dtype: torch.dtype) -> bytes:
    """Header for tensors stored back to back in shard order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        size = _nbytes(t.shape, dtype)
        header[t.name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    return len(raw).to_bytes(8, "little") + raw


class _TensorSource:
    """Generates canonical tensors on demand, each kept only until its last use."""

    def __init__(self, canons: list[Canon], tensors: list[OutTensor], seed: int, dtype: torch.dtype,
                 device: str = "cpu") -> None:
        self._by_name = {c.name: c for c in canons}
        self._remaining = Counter(t.source for t in tensors)
        self._cache: dict[str, torch.Tensor] = {}
        self._seed, self._dtype, self._device = seed, dtype, device

    def get(self, t: OutTensor) -> torch.Tensor:
        if t.source not in self._cache:
            self._cache[t.source] = generate(self._by_name[t.source], self._seed, self._dtype, self._device)
        base = self._cache[t.source]
        self._remaining[t.source] -= 1
        if self._remaining[t.source] == 0:
            del self._cache[t.source]
        out = (t.derive(base) if t.derive else base).contiguous().cpu()
        assert tuple(out.shape) == t.shape, (t.name, tuple(out.shape), t.shape)
        return out


def write_weights(
    out_dir: Path,
    tensors: list[OutTensor],
    canons: list[Canon],
    seed: int,
    dtype: torch.dtype,
    shard_bytes: int,
    progress: bool,
    device: str = "cpu",
) -> None:
    """Stream tensors straight into safetensors shards.

    The layout is planned up front, so each header is known before any data is
    drawn and only one canonical tensor is in memory at a time (8B fits easily).
    """
    source = _TensorSource(canons, tensors, seed, dtype, device)
    shards = plan_shards(tensors, dtype, shard_bytes)
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(tensors), desc="writing tensors", unit="tensor", disable=not progress)
    for idx, shard in enumerate(shards, start=1):
        fname = f"model-{idx:05d}-of-{len(shards):05d}.safetensors"
        with open(out_dir / fname, "wb") as f:
            f.write(_safetensors_header(shard, dtype))
            for t in shard:
                f.write(source.get(t).view(-1).view(torch.uint8).numpy().data)
                weight_map[t.name] = fname
                bar.update(1)
    bar.close()
    total = sum(_nbytes(t.shape, dtype) for t in tensors)
    _write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- configs


def _original_vision_config(v: VitDims) -> dict:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden,
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "intermediate_size": v.mlp,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "num_channels": 3,
        "qkv_bias": v.qkv_bias,
        "qk_normalization": v.qk_norm,
        "norm_type": v.norm_type,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "initializer_factor": 0.1,
        "drop_path_rate": 0.0,
        "use_flash_attn": False,
    }


def _llm_dim_keys(t: LlmDims) -> dict:
    return {
        "hidden_size": t.hidden,
        "intermediate_size": t.mlp,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads,
        "rms_norm_eps": t.rms_eps,
        "rope_theta": 1e6,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "vocab_size": t.vocab,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }


def _original_llm_config(t: LlmDims, dtype: str) -> dict:
    if t.kind == "qwen2":
        head = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
        ids = {"bos_token_id": 151643, "eos_token_id": 151645}
    else:
        head = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False}
        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    return {**head, **_llm_dim_keys(t), **ids, "torch_dtype": dtype}


def original_config(v: VitDims, t: LlmDims, dtype: str, max_dynamic_patch: int) -> dict:
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": "internvl2_5" if t.kind == "qwen2" else "internlm2-chat",
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "dynamic_image_size": True,
        "force_image_size": IMAGE_SIZE,
        "max_dynamic_patch": max_dynamic_patch,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "use_thumbnail": True,
        "torch_dtype": dtype,
        "tie_word_embeddings": False,
        "vision_config": _original_vision_config(v),
        "llm_config": _original_llm_config(t, dtype),
    }


def _hf_text_config(t: LlmDims, dtype: str) -> dict:
    if t.kind == "qwen2":
        ids = {"bos_token_id": 151643, "eos_token_id": 151645}
        return {"model_type": "qwen2", **_llm_dim_keys(t), **ids, "torch_dtype": dtype}
    # InternLM2 is architecturally Llama once wqkv is split.
    return {
        "model_type": "llama",
        **_llm_dim_keys(t),
        "head_dim": t.head_dim,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 92542,
        "pad_token_id": 2,
        "torch_dtype": dtype,
    }


def hf_config(v: VitDims, t: LlmDims, dtype: str) -> dict:
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "image_seq_length": IMAGE_SEQ_LENGTH,
        "image_token_id": special_tokens(t.kind)["<IMG_CONTEXT>"],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "text_config": _hf_text_config(t, dtype),
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": v.hidden,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "intermediate_size": v.mlp,
            "attention_bias": v.qkv_bias,
            "use_qk_norm": v.qk_norm,
            "norm_type": v.norm_type,
            "layer_norm_eps": 1e-6,
            "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            "patch_size": [PATCH_SIZE, PATCH_SIZE],
            "num_channels": 3,
            "hidden_act": "gelu",
            "layer_scale_init_value": 0.1,
            "use_mean_pooling": True,
            "use_absolute_position_embeddings": True,
        },
    }


def preprocessor_config(max_dynamic_patch: int) -> dict:
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": max_dynamic_patch,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
    }


def generation_config(kind: str) -> dict:
    if kind == "qwen2":
        return {"eos_token_id": [151645, 151643], "bos_token_id": 151643}
    return {"eos_token_id": [92542, 2], "bos_token_id": 1}


# -------------------------------------------------------------------- tokenizer

QWEN2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
INTERNLM2_SPECIALS = [
    "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>",
]  # fmt: skip

# Small English sample the merges are learned from (deterministically).
MERGE_CORPUS = """
The quick brown fox jumps over the lazy dog. What is in this image? Please describe the picture in detail.
The image shows a cat sitting on a table next to a window, and there is a dog in the garden.
There are two people standing in front of the building. The sky is blue and the weather is sunny.
A man is riding a bicycle on the street while a woman is walking with her child.
This is a photo of a red car parked near the house. The tree behind the car has green leaves.
Describe the following images and compare them. What are the differences between the first and the second?
Answer the question with a single word or phrase. How many animals are there in the picture?
The text in the image says hello world. Read the document and summarize the main points.
In the morning the children went to the school, and in the evening they returned to their homes.
The information in the table shows that the number of students increased during the year.
You are a helpful assistant that answers questions about images, documents, charts and videos.
The chart compares the population of three countries; the first country has the highest value.
She said that the weather would be better tomorrow, but the report was not correct.
The restaurant is located at the corner of the street, between the station and the hotel.
Thank you for the question. Here is the answer: the object on the left is a bottle of water.
""".strip()


def special_tokens(kind: str) -> dict[str, int]:
    """Special/added token -> id, exactly as in the real checkpoints ("qwen2_vl": a Qwen2-VL /
    Qwen2.5-VL tokenizer, the Qwen2 specials without InternVL's)."""
    if kind in ("qwen2", "qwen2_vl"):
        names = QWEN2_SPECIALS + (INTERNVL_SPECIALS if kind == "qwen2" else [])
        return {tok: 151643 + i for i, tok in enumerate(names)}
    names = INTERNLM2_SPECIALS + INTERNVL_SPECIALS
    return {"<unk>": 0, "<s>": 1, "</s>": 2, **{tok: 92538 + i for i, tok in enumerate(names)}}


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (index = byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def _merge_pair(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def learn_merges(corpus: str, max_merges: int = 300) -> list[tuple[str, str]]:
    """Tiny deterministic BPE trainer (ties broken lexicographically)."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    counts = Counter(word for word, _ in pre.pre_tokenize_str(corpus))
    seqs = {word: list(word) for word in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in counts.items():
            s = seqs[word]
            for pair in zip(s, s[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        seqs = {w: _merge_pair(s, best) for w, s in seqs.items()}
    return merges


def _filler_tokens(symbols: list[str]) -> Iterator[str]:
    """Unique byte-level strings: all byte pairs, then byte triples."""
    for a in symbols:
        for b in symbols:
            yield a + b
    for a in symbols:
        for b in symbols:
            for c in symbols:
                yield a + b + c


def build_vocab(kind: str, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every id < vocab_size maps to a real token: bytes, merges, fillers, specials."""
    specials = special_tokens(kind)
    symbols = _byte_symbols()
    merges = learn_merges(MERGE_CORPUS)
    vocab: dict[str, int] = {tok: i for tok, i in specials.items()}
    taken_ids = set(vocab.values())
    next_id = 0

    def add(token: str) -> None:
        nonlocal next_id
        if token in vocab:
            return
        while next_id in taken_ids:
            next_id += 1
        vocab[token] = next_id
        taken_ids.add(next_id)

    for sym in symbols:  # ids 0..255 (3..258 for InternLM2, after <unk> <s> </s>)
        add(sym)
    for a, b in merges:
        add(a + b)
    fillers = _filler_tokens(symbols)
    while len(vocab) < vocab_size:
        add(next(fillers))
    assert sorted(vocab.values()) == list(range(vocab_size))
    return vocab, merges


def build_tokenizer(kind: str, vocab_size: int) -> Tokenizer:
    vocab, merges = build_vocab(kind, vocab_size)
    unk = "<unk>" if kind == "internlm2" else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if kind in ("qwen2", "qwen2_vl"):
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:  # InternLM2 prepends <s>; add_special_tokens=False skips it.
        tok.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
        )
    specials = special_tokens(kind)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)]
    )
    return tok


CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _special_roles(kind: str) -> dict[str, str | None]:
    if kind in ("qwen2", "qwen2_vl"):
        return {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}
    return {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "</s>", "unk_token": "<unk>"}


def tokenizer_config(kind: str) -> dict:
    decoder = {
        str(i): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True
        }
        for tok, i in sorted(special_tokens(kind).items(), key=lambda kv: kv[1])
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        **_special_roles(kind),
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map(kind: str) -> dict:
    roles = {k: v for k, v in _special_roles(kind).items() if v is not None}
    extra = [t for t in special_tokens(kind) if t not in roles.values()]
    return {**roles, "additional_special_tokens": extra}


def write_tokenizer(out_dir: Path, kind: str, vocab_size: int) -> None:
    build_tokenizer(kind, vocab_size).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(kind))
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map(kind))


# --------------------------------------------------------------------------- main


def _readme(command: str, layout: str, llm: str, size: str, vit: str, seed: int) -> str:
    return (
        "# Random-weight InternVL checkpoint\n\n"
        "This checkpoint has RANDOM weights and a synthetic byte-level tokenizer. It is for\n"
        "testing loaders and serving code only; its outputs are meaningless.\n\n"
        f"- layout: `{layout}`, llm: `{llm}`, size: `{size}`, vit: `{vit}`, seed: `{seed}`\n\n"
        "Made with:\n\n"
        f"```\n{command}\n```\n"
    )


def _command_line(**kw: object) -> str:
    args = ["python", "scripts/make_tiny_internvl.py"]
    for key, value in kw.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(args)


def make_checkpoint(
    out_dir: str,
    layout: str = "original",
    llm: str = "qwen2",
    size: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    vit: str = "300m",
    hf_key_style: str = "legacy",
    max_dynamic_patch: int = 12,
    shard_bytes: int | None = None,
    device: str = "cpu",
) -> str:
    """Write a random-weight InternVL checkpoint into ``out_dir`` and return it."""
    if layout not in ("original", "hf"):
        raise ValueError(f"unknown layout {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    v, t = vit_dims(size, vit), llm_dims(size, llm)
    torch_dtype = DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    canons = canonical_tensors(v, t)
    if layout == "original":
        tensors = original_layout(canons)
        _write_json(out / "config.json", original_config(v, t, dtype, max_dynamic_patch))
    else:
        tensors = hf_layout(canons, v, t, hf_key_style)
        _write_json(out / "config.json", hf_config(v, t, dtype))
        _write_json(out / "preprocessor_config.json", preprocessor_config(max_dynamic_patch))

    if shard_bytes is None:
        total = sum(_nbytes(x.shape, torch_dtype) for x in tensors)
        # Tiny checkpoints still get >= 2 shards so sharded loading is exercised.
        shard_bytes = total // 2 if size == "tiny" else BIG_SHARD_BYTES
    write_weights(out, tensors, canons, seed, torch_dtype, shard_bytes, progress=size != "tiny", device=device)

    _write_json(out / "generation_config.json", generation_config(llm))
    write_tokenizer(out, llm, t.vocab)
    command = _command_line(
        out=out_dir, layout=layout, llm=llm, size=size, seed=seed, dtype=dtype, vit=vit,
        hf_key_style=hf_key_style if layout == "hf" else None, max_dynamic_patch=max_dynamic_patch,
        device=device if device != "cpu" else None,
    )  # fmt: skip
    (out / "README.md").write_text(_readme(command, layout, llm, size, vit, seed), encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layout", choices=["original", "hf"], default="original")
    p.add_argument("--llm", choices=["qwen2", "internlm2"], default="qwen2")
    p.add_argument("--size", choices=["tiny", "1b", "2b", "8b"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--vit", choices=["300m", "6b"], default="300m")
    p.add_argument("--hf-key-style", choices=["legacy", "v5"], default="legacy")
    p.add_argument("--max-dynamic-patch", type=int, default=12)
    p.add_argument("--shard-bytes", type=int, default=None, help="max bytes per safetensors shard")
    p.add_argument("--device", default="cpu",
                   help="where to draw the random values: cuda is much faster for full sizes, but gives "
                        "other values than cpu (each device type has its own generator)")
    a = p.parse_args(argv)
    out = make_checkpoint(
        a.out, layout=a.layout, llm=a.llm, size=a.size, seed=a.seed, dtype=a.dtype, vit=a.vit,
        hf_key_style=a.hf_key_style, max_dynamic_patch=a.max_dynamic_patch, shard_bytes=a.shard_bytes,
        device=a.device,
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
