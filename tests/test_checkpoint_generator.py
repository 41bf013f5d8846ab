"""Tests for scripts/make_tiny_internvl.py (random-weight InternVL checkpoints)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local dirs only; never reach for the hub

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_internvl.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_internvl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mk = _load_script()

VOCAB = {"qwen2": 151674, "internlm2": 92553}
QWEN2_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|file_sep|>": 151664,
    "<img>": 151665, "</img>": 151666, "<IMG_CONTEXT>": 151667, "<quad>": 151668, "</quad>": 151669,
    "<ref>": 151670, "</ref>": 151671, "<box>": 151672, "</box>": 151673,
}  # fmt: skip
INTERNLM2_IDS = {
    "<unk>": 0, "<s>": 1, "</s>": 2,
    "<|plugin|>": 92538, "<|interpreter|>": 92539, "<|action_end|>": 92540, "<|action_start|>": 92541,
    "<|im_end|>": 92542, "<|im_start|>": 92543, "<img>": 92544, "</img>": 92545, "<IMG_CONTEXT>": 92546,
    "<quad>": 92547, "</quad>": 92548, "<ref>": 92549, "</ref>": 92550, "<box>": 92551, "</box>": 92552,
}  # fmt: skip
SPECIAL_IDS = {"qwen2": QWEN2_IDS, "internlm2": INTERNLM2_IDS}


# ---------------------------------------------------------------- fixtures


_CACHE: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """Build (and memoise) a tiny checkpoint for the given make_checkpoint kwargs."""

    def _make(**kw) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in _CACHE:
            out = tmp_path_factory.mktemp("ckpt")
            assert mk.make_checkpoint(str(out), **kw) == str(out)
            _CACHE[key] = out
        return _CACHE[key]

    return _make


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(ckpt / fname)))
    assert set(tensors) == set(index["weight_map"])
    return tensors


# ------------------------------------------------------------ file layout


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_files_and_shards(make, layout, llm):
    ckpt = make(layout=layout, llm=llm)
    expected = {
        "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "README.md",
    }  # fmt: skip
    if layout == "hf":
        expected.add("preprocessor_config.json")
    names = {p.name for p in ckpt.iterdir()}
    assert expected <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2, "tiny checkpoints must be sharded"
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    tensors = read_weights(ckpt)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert "random" in (ckpt / "README.md").read_text().lower()

    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen == (
        {"eos_token_id": [151645, 151643], "bos_token_id": 151643}
        if llm == "qwen2"
        else {"eos_token_id": [92542, 2], "bos_token_id": 1}
    )


def test_original_config(make):
    cfg = json.loads((make(layout="original", llm="internlm2", max_dynamic_patch=6) / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLChatModel"] and cfg["model_type"] == "internvl_chat"
    assert cfg["template"] == "internlm2-chat" and cfg["max_dynamic_patch"] == 6
    assert cfg["vision_config"]["norm_type"] == "layer_norm" and cfg["vision_config"]["qkv_bias"] is True
    llm = cfg["llm_config"]
    assert llm["architectures"] == ["InternLM2ForCausalLM"] and llm["vocab_size"] == 92553
    assert (llm["bos_token_id"], llm["eos_token_id"], llm["pad_token_id"]) == (1, 2, 2)
    qcfg = json.loads((make(layout="original", llm="qwen2") / "config.json").read_text())
    assert qcfg["template"] == "internvl2_5" and qcfg["llm_config"]["model_type"] == "qwen2"


def test_dtype_and_determinism(make, tmp_path):
    bf16 = read_weights(make(layout="original", llm="qwen2", dtype="bfloat16"))
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in bf16.values())
    a = read_weights(make(layout="original", llm="qwen2"))
    b = read_weights(Path(mk.make_checkpoint(str(tmp_path / "again"), layout="original", llm="qwen2")))
    c = read_weights(Path(mk.make_checkpoint(str(tmp_path / "seed1"), layout="original", llm="qwen2", seed=1)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mlp1.1.weight"], c["mlp1.1.weight"])


def test_cli(tmp_path):
    out = tmp_path / "cli"
    assert mk.main(["--out", str(out), "--layout", "hf", "--llm", "internlm2", "--max-dynamic-patch", "4"]) == 0
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "GotOcr2ImageProcessor" and pre["max_patches"] == 4
    assert "--layout hf" in (out / "README.md").read_text()


# --------------------------------------------------- transformers loading


def _load_hf(ckpt: Path):
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(str(ckpt), output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert not info["error_msgs"], info["error_msgs"]
    return model.eval()


def _v5_name(key: str) -> str:
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model.") :]
    return key if key.startswith(("model.", "lm_head.")) else "model." + key


@pytest.mark.parametrize("key_style", ["legacy", "v5"])
@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_hf_layout_loads_in_transformers(make, llm, key_style):
    ckpt = make(layout="hf", llm=llm, hf_key_style=key_style)
    model = _load_hf(ckpt)
    text = model.config.text_config
    assert text.model_type == ("qwen2" if llm == "qwen2" else "llama")
    assert text.vocab_size == VOCAB[llm]
    assert model.config.image_token_id == SPECIAL_IDS[llm]["<IMG_CONTEXT>"]
    # Every stored tensor landed unchanged (nothing re-initialised or tied away).
    state = model.state_dict()
    stored = read_weights(ckpt)
    if key_style == "v5":
        assert all(k.startswith(("model.", "lm_head.")) for k in stored)
    assert {_v5_name(k) for k in stored} == set(state)
    for key, tensor in stored.items():
        assert torch.equal(state[_v5_name(key)], tensor), key


def test_vit_6b_loads_in_transformers(make):
    ckpt = make(layout="hf", llm="qwen2", vit="6b")
    model = _load_hf(ckpt)
    vcfg = model.config.vision_config
    assert vcfg.norm_type == "rms_norm" and vcfg.use_qk_norm is True and vcfg.attention_bias is False
    layer = model.model.vision_tower.encoder.layer[0]
    assert layer.attention.q_proj.bias is None
    stored = read_weights(ckpt)
    assert "vision_tower.encoder.layer.0.attention.q_norm.weight" in stored
    assert "vision_tower.encoder.layer.0.layernorm_before.bias" not in stored
    orig = read_weights(make(layout="original", llm="qwen2", vit="6b"))
    assert "vision_model.encoder.layers.0.attn.k_norm.weight" in orig
    assert "vision_model.encoder.layers.0.attn.qkv.bias" not in orig


def _solid_image(channel: int | None) -> torch.Tensor:
    x = torch.zeros(1, 3, 448, 448)
    if channel is not None:
        x[:, channel] = 1.0
    return (x - 0.45) / 0.225


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_random_model_is_not_degenerate(make, llm):
    model = _load_hf(make(layout="hf", llm=llm))
    image_id = model.config.image_token_id
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text_tokens = {
            model(input_ids=torch.randint(3, 1000, (1, 6), generator=g)).logits[0, -1].argmax().item()
            for _ in range(4)
        }
        ids = torch.tensor([[300] + [image_id] * 256 + [400, 500]])
        image_tokens = {
            model(input_ids=ids, pixel_values=_solid_image(c), logits_to_keep=1).logits[0, -1].argmax().item()
            for c in (None, 0, 1, 2)
        }
    assert len(text_tokens) >= 3, text_tokens
    assert len(image_tokens) >= 3, image_tokens


# ------------------------------------------------- original <-> hf mapping

# Documented 1:1 renames original -> hf (legacy keys); fused tensors are checked separately.
_RENAMES = [
    ("vision_model.embeddings.class_embedding", "vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.patch_embedding.", "vision_tower.embeddings.patch_embeddings.projection."),
    ("vision_model.embeddings.position_embedding", "vision_tower.embeddings.position_embeddings"),
    ("vision_model.encoder.layers.", "vision_tower.encoder.layer."),
    (".attn.proj.", ".attention.projection_layer."),
    (".attn.q_norm.", ".attention.q_norm."),
    (".attn.k_norm.", ".attention.k_norm."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
    (".ls1", ".lambda_1"),
    (".ls2", ".lambda_2"),
    ("mlp1.0.", "multi_modal_projector.layer_norm."),
    ("mlp1.1.", "multi_modal_projector.linear_1."),
    ("mlp1.3.", "multi_modal_projector.linear_2."),
    (".tok_embeddings.", ".embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    ("language_model.output.", "language_model.lm_head."),
]


def _hf_name(orig: str) -> str:
    for old, new in _RENAMES:
        orig = orig.replace(old, new)
    return orig


def _fuse_internlm2_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Rebuild InternLM2's grouped wqkv: per kv head j, [q heads j*g..j*g+g-1, k_j, v_j]."""
    hidden = q.shape[1]
    head_dim = k.shape[0] // kv_heads
    g = q.shape[0] // head_dim // kv_heads
    groups = torch.cat(
        [
            q.view(kv_heads, g, head_dim, hidden),
            k.view(kv_heads, 1, head_dim, hidden),
            v.view(kv_heads, 1, head_dim, hidden),
        ],
        dim=1,
    )
    return groups.reshape(-1, hidden)


@pytest.mark.parametrize("vit", ["300m", "6b"])
@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_original_equals_hf_after_mapping(make, llm, vit):
    orig = read_weights(make(layout="original", llm=llm, vit=vit))
    hf = read_weights(make(layout="hf", llm=llm, vit=vit))
    covered: set[str] = set()
    for name, tensor in orig.items():
        if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
            prefix = _hf_name(name.rsplit(".attn.qkv.", 1)[0]) + ".attention."
            kind = name.rsplit(".", 1)[1]
            parts = [f"{prefix}{p}_proj.{kind}" for p in "qkv"]
            fused = torch.cat([hf[p] for p in parts])
        elif name.endswith(".attention.wqkv.weight"):
            prefix = name.rsplit(".attention.wqkv.", 1)[0] + ".self_attn."
            parts = [f"{prefix}{p}_proj.weight" for p in "qkv"]
            kv_heads = mk.llm_dims("tiny", llm).kv_heads
            fused = _fuse_internlm2_wqkv(*(hf[p] for p in parts), kv_heads=kv_heads)
        else:
            parts = [_hf_name(name)]
            fused = hf[parts[0]]
        assert fused.shape == tensor.shape, name
        assert torch.equal(fused, tensor), name
        covered.update(parts)
    assert covered == set(hf), set(hf) ^ covered


def test_internlm2_wqkv_grouping_matches_head_order(make):
    """Check the grouped layout against a per-head reading, not just its inverse."""
    t = mk.llm_dims("tiny", "internlm2")
    g, hd = t.heads // t.kv_heads, t.head_dim
    wqkv = read_weights(make(layout="original", llm="internlm2"))["language_model.model.layers.1.attention.wqkv.weight"]
    hf = read_weights(make(layout="hf", llm="internlm2"))
    q = hf["language_model.model.layers.1.self_attn.q_proj.weight"]
    k = hf["language_model.model.layers.1.self_attn.k_proj.weight"]
    v = hf["language_model.model.layers.1.self_attn.v_proj.weight"]
    for j in range(t.kv_heads):
        base = j * (g + 2) * hd
        for i in range(g):
            head = j * g + i
            assert torch.equal(q[head * hd : (head + 1) * hd], wqkv[base + i * hd : base + (i + 1) * hd])
        assert torch.equal(k[j * hd : (j + 1) * hd], wqkv[base + g * hd : base + (g + 1) * hd])
        assert torch.equal(v[j * hd : (j + 1) * hd], wqkv[base + (g + 1) * hd : base + (g + 2) * hd])


def test_hf_v5_keys_hold_same_values_as_legacy(make):
    legacy = read_weights(make(layout="hf", llm="qwen2"))
    v5 = read_weights(make(layout="hf", llm="qwen2", hf_key_style="v5"))
    assert "lm_head.weight" in v5 and "model.language_model.embed_tokens.weight" in v5
    assert {_v5_name(k) for k in legacy} == set(v5)
    assert all(torch.equal(v5[_v5_name(k)], t) for k, t in legacy.items())


# -------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_tokenizer_loads_and_specials(make, llm):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ckpt = make(layout="original", llm=llm)
    raw = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    assert raw.get_vocab_size() == VOCAB[llm] and len(tok) == VOCAB[llm]
    for token, idx in SPECIAL_IDS[llm].items():
        assert raw.token_to_id(token) == idx, token
        assert tok.convert_tokens_to_ids(token) == idx, token
    if llm == "qwen2":  # the Qwen specials in between are contiguous
        assert [raw.id_to_token(i) for i in range(151643, 151665)] == mk.QWEN2_SPECIALS

    for t in (raw, tok):
        enc = t.encode("<img></img>", add_special_tokens=False)
        ids = enc.ids if hasattr(enc, "ids") else enc
        assert ids == [SPECIAL_IDS[llm]["<img>"], SPECIAL_IDS[llm]["</img>"]]
        enc = t.encode("<IMG_CONTEXT>", add_special_tokens=False)
        assert (enc.ids if hasattr(enc, "ids") else enc) == [SPECIAL_IDS[llm]["<IMG_CONTEXT>"]]
    # <image> is a text placeholder, not a token.
    assert len(tok.encode("<image>", add_special_tokens=False)) > 1

    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == SPECIAL_IDS[llm]["<|im_end|>"]
    assert tok.model_max_length == 32768
    if llm == "qwen2":
        assert tok.bos_token is None
    else:
        assert tok.bos_token == "<s>" and tok.bos_token_id == 1


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_tokenizer_bos_and_roundtrip(make, llm):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ckpt = make(layout="original", llm=llm)
    raw = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    text = "héllo 世界"
    plain = tok.encode(text, add_special_tokens=False)
    assert plain == raw.encode(text, add_special_tokens=False).ids
    assert plain[0] != 1  # add_special_tokens=False never adds BOS
    with_special = tok.encode(text)
    assert raw.encode(text).ids == with_special
    if llm == "internlm2":
        assert with_special == [1] + plain
        assert tok.decode(with_special, skip_special_tokens=True) == text
    else:
        assert with_special == plain
        assert tok.decode(with_special) == text
    assert raw.decode(plain) == text
    # Ordinary English compresses below one token per byte.
    sentence = "The image shows a cat sitting on the table."
    assert len(raw.encode(sentence, add_special_tokens=False).ids) < len(sentence.encode()) // 2


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_every_id_decodes(make, llm):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(make(layout="original", llm=llm) / "tokenizer.json"))
    ids = list(range(VOCAB[llm]))
    assert all(raw.id_to_token(i) is not None for i in ids)
    pieces = raw.decode_batch([[i] for i in ids], skip_special_tokens=False)
    assert len(pieces) == len(ids) and all(isinstance(p, str) and p for p in pieces)
    offset = 3 if llm == "internlm2" else 0
    # Byte tokens decode to exactly their byte.
    assert [raw.decode([offset + b]) for b in range(ord("a"), ord("e"))] == ["a", "b", "c", "d"]
    assert raw.decode([offset + 0xE4, offset + 0xB8, offset + 0x96]) == "世"


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_chat_template(make, llm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make(layout="original", llm=llm)))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>system\nBe brief.<|im_end|>\n"


# ------------------------------------------------------------ real sizes

# Parameter counts of the real checkpoints these sizes mimic.
REAL_PARAMS = {
    ("1b", "qwen2"): 938_193_024,  # InternVL2.5-1B
    ("2b", "qwen2"): 2_088_957_440,  # InternVL3-2B
    ("2b", "internlm2"): 2_205_754_368,  # InternVL2-2B
    ("8b", "qwen2"): 7_944_373_760,  # InternVL3-8B
    ("8b", "internlm2"): 8_075_365_376,  # InternVL2-8B
}


@pytest.mark.parametrize(("size", "llm"), sorted(REAL_PARAMS))
def test_real_size_param_counts(size, llm):
    canons = mk.canonical_tensors(mk.vit_dims(size, "300m"), mk.llm_dims(size, llm))
    total = sum(torch.Size(c.shape).numel() for c in canons)
    assert total == REAL_PARAMS[(size, llm)]


@pytest.mark.parametrize(
    ("size", "llm", "vit"), [("1b", "qwen2", "300m"), ("8b", "internlm2", "300m"), ("2b", "qwen2", "6b")]
)
def test_real_size_hf_shapes_match_transformers(tmp_path, size, llm, vit):
    """Big configs instantiate on the meta device with exactly our names and shapes."""
    from transformers import AutoConfig, InternVLForConditionalGeneration

    v, t = mk.vit_dims(size, vit), mk.llm_dims(size, llm)
    (tmp_path / "config.json").write_text(json.dumps(mk.hf_config(v, t, "bfloat16")))
    config = AutoConfig.from_pretrained(str(tmp_path))
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    expected = {o.name: o.shape for o in mk.hf_layout(mk.canonical_tensors(v, t), v, t, "v5")}
    assert {k: tuple(p.shape) for k, p in model.state_dict().items()} == expected


def test_explicit_shard_bytes(tmp_path):
    out = Path(mk.make_checkpoint(str(tmp_path / "many"), layout="original", llm="internlm2", shard_bytes=1 << 18))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 5
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {p.name for p in shards} == set(index["weight_map"].values())
    assert len(read_weights(out)) == len(index["weight_map"])
