"""The qwen2_vl family on its own, against transformers 5.23 (float32, CPU): the registry and
sparse configs, preprocessing (bit for bit the PIL image processor), both vision towers on a
list of variable-size images (Qwen2.5-VL windows, partial ones included), get_rope_index, the
chat template, prompt expansion and the image options."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import random_image
from mmserver.models.errors import ConfigError, OptionError, PromptError
from mmserver.models.qwen2_vl.family import QwenVLFamily
from mmserver.models.qwen2_vl.prompt import VISION
from mmserver.models.qwen2_vl.vision import window_index
from mmserver.models.registry import load_family

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
MAX_PIXELS = 28 * 28 * 256  # the tiny checkpoints' server range: [3136, 200704]


@pytest.fixture(scope="module", params=FAMILIES)
def qdir(request, qwen_checkpoints):
    return qwen_checkpoints(request.param, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def family(qdir):
    return load_family(qdir)


@pytest.fixture(scope="module")
def hf(qdir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(qdir), dtype=torch.float32).eval()


def hf_processor(min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def test_registry_and_sparse_config(family, qdir):
    assert isinstance(family, QwenVLFamily)
    cfg = family.config
    assert f"/{cfg.kind}-" in str(qdir)
    v = cfg.vision
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) == (14, 2, 2)  # class defaults
    assert cfg.llm.mrope_section == (2, 3, 3) and cfg.llm.tie_word_embeddings
    assert v.out_hidden_size == cfg.llm.hidden_size == 64
    if cfg.kind == "qwen2_vl":
        assert (v.width, v.intermediate_size, v.hidden_act, v.window) == (32, 128, "quick_gelu", 0)
    else:
        assert (v.width, v.intermediate_size, v.hidden_act, v.window, v.fullatt_block_indexes) == \
            (32, 48, "silu", 4, (2,))
    assert (family.min_pixels, family.max_pixels) == (3136, MAX_PIXELS)
    assert family.stop_token_ids() == [151643, 151645]


def test_real_config_defaults(tmp_path):
    """The hub's Qwen2-VL-7B vision_config is three keys: the rest are class defaults."""
    import json

    from mmserver.models.qwen2_vl.config import load_config

    raw = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 3584,
           "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "vocab_size": 152064, "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
           "vision_config": {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(tmp_path)
    assert (cfg.vision.depth, cfg.vision.width, cfg.vision.num_heads, cfg.vision.intermediate_size) == (32, 1280, 16,
                                                                                                          5120)
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 1003520)  # no preprocessor_config: the class defaults
    raw["vision_config"]["hidden_size"] = 1536  # 2B's merger output, on a 7B LLM
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="merger outputs 1536"):
        load_config(tmp_path)


# --------------------------------------------------------------------------- preprocessing

SIZES = [(230, 150), (20, 30), (900, 700), (333, 111), (56, 56)]  # odd sides, below min, above max, ...


@pytest.mark.parametrize("size", SIZES)
def test_pixels_equal_the_pil_processor(family, size):
    img = random_image(*size, seed=size[0])
    options = family.image_options({}, {})
    ref = hf_processor(family.min_pixels, family.max_pixels)(images=[img], return_tensors="pt")
    ours = family.preprocess(img, options, normalize=True)
    assert list(ours.grid) == ref["image_grid_thw"][0].tolist()
    assert torch.equal(ours.pixels, ref["pixel_values"])  # bit for bit
    plan = family.plan_image(*size, options)
    assert plan.grid == ours.grid and plan.n_tokens == ours.n_tokens == ref["image_grid_thw"][0].prod() // 4
    compact = family.preprocess(img, options)
    assert compact.pixels.dtype == torch.uint8 and compact.grid == ours.grid
    from mmserver.models.qwen2_vl.preprocess import patchify

    assert torch.equal(patchify(compact.pixels, family.config.image_mean, family.config.image_std), ours.pixels)


def test_alpha_is_composited_on_white(family):
    rgba = Image.new("RGBA", (120, 90), (200, 10, 10, 0))
    rgba.paste((0, 0, 255, 128), (0, 0, 60, 90))
    ref = hf_processor(family.min_pixels, family.max_pixels)(images=[rgba], return_tensors="pt")
    assert torch.equal(family.preprocess(rgba, family.image_options({}, {}), normalize=True).pixels,
                       ref["pixel_values"])


def test_max_pixels_caps_the_grid(family):
    plan = family.plan_image(4032, 3024, family.image_options({}, {}))
    assert plan.n_tokens <= MAX_PIXELS // (28 * 28)
    small = family.plan_image(4032, 3024, family.image_options({"max_pixels": 28 * 28 * 64}, {}))
    assert small.n_tokens <= 64 and small.grid[1] * small.grid[2] // 4 == small.n_tokens


# --------------------------------------------------------------------------- vision tower


def test_vision_features_match_transformers(family, hf):
    """Three images of different sizes in one packed call (Qwen2.5-VL: 2-4 windows each, partial
    ones at the edges), against transformers' get_image_features."""
    images = [random_image(230, 150, 1), random_image(300, 250, 2), random_image(60, 90, 3)]
    proc = hf_processor(family.min_pixels, family.max_pixels)(images=images, return_tensors="pt")
    ref = hf.model.get_image_features(pixel_values=proc["pixel_values"], image_grid_thw=proc["image_grid_thw"],
                                      return_dict=True).pooler_output
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    options = family.image_options({}, {})
    weights = family.load_weights(components=("vision",), progress=False)
    encoder = family.build_encoder(weights)
    for normalize in (True, False):
        rows = encoder.encode_images([family.preprocess(im, options, normalize=normalize) for im in images])
        assert [r.shape[0] for r in rows] == [int(g.prod()) // 4 for g in proc["image_grid_thw"]]
        torch.testing.assert_close(torch.cat(rows), ref, atol=1e-5, rtol=0)
    alone = encoder.encode_images([family.preprocess(images[1], options)])[0]
    torch.testing.assert_close(alone, rows[1], atol=1e-5, rtol=0)  # packing does not leak between images
    warm = family.warmup_input()
    assert encoder.encode_images([warm])[0].shape == (warm.n_tokens, 64)


def test_window_index_matches_transformers():
    from transformers.vision_utils import get_vision_window_index

    grids = [(1, 16, 20), (1, 10, 16), (1, 8, 8), (1, 4, 6)]
    ref_index, ref_cu = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    index, cu = window_index(grids, 2, 4)
    assert index.tolist() == ref_index.tolist()
    assert sorted(set(cu)) == ref_cu.tolist()
    assert [b - a for a, b in zip(cu, cu[1:])][:6] == [64, 64, 32, 64, 64, 32]  # the reference's worked example


# --------------------------------------------------------------------------- prompts and positions


def test_chat_template_matches_the_checkpoints(family, qdir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qdir))
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"}, {"type": "image"}]}],
    ]
    for msgs in conversations:
        assert family.render_chat(msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert family.question_with_images("Describe.", 2) == VISION * 2 + "Describe."


def test_expansion_and_spans(family):
    s = family.special
    for prompt in ("<image>\nhi <image>", f"{VISION}\nhi {VISION}"):
        ids, spans = family.expand_prompt(prompt, [4, 6])
        assert [(n, set(ids[a:a + n])) for a, n in spans] == [(4, {s.image_pad}), (6, {s.image_pad})]
        for a, n in spans:
            assert ids[a - 1] == s.vision_start and ids[a + n] == s.vision_end
        assert family.find_spans(ids) == spans
    with pytest.raises(PromptError, match="1 image placeholder"):
        family.expand_prompt("<image> hi", [4, 4])


def test_rope_index_matches_transformers(family, hf):
    """Two images of different shapes, text around and between: positions and delta as
    transformers' get_rope_index (with mm_token_type_ids)."""
    options = family.image_options({}, {})
    plans = [family.plan_image(230, 150, options), family.plan_image(90, 300, options)]
    ids, spans = family.expand_prompt(f"a b{VISION}c d e{VISION}f", [p.n_tokens for p in plans])
    got = family.rope_inputs(ids, spans, [p.grid for p in plans])
    t = torch.tensor([ids])
    ref, delta = hf.model.get_rope_index(t, (t == 151655).int(), image_grid_thw=torch.tensor([p.grid for p in plans]))
    assert torch.equal(got["rope_positions"], ref[:, 0])
    assert got["rope_delta"] == int(delta[0])
    assert family.rope_inputs(ids[:3], [], []) == {}  # text only: plain RoPE


# --------------------------------------------------------------------------- image options


def test_image_options_narrow_only(family):
    lo, hi = family.min_pixels, family.max_pixels
    assert family.image_options({}, {}) == f"px{lo}-{hi}"
    assert family.image_options({"max_pixels": 50000}, {}) == f"px{lo}-50000"
    assert family.image_options({"max_pixels": 50000}, {"max_pixels": 40000, "min_pixels": 5000}) == "px5000-40000"
    assert family.image_options({"image_max_patch_num": 3}, {"detail": "auto"}) == f"px{lo}-{hi}"  # others ignored
    with pytest.raises(OptionError) as e:
        family.image_options({"max_pixels": hi + 1}, {})
    assert e.value.name == "max_pixels" and f"[{lo}, {hi}]" in e.value.detail
    with pytest.raises(OptionError) as e:
        family.image_options({}, {"min_pixels": lo - 1})
    assert e.value.name == "min_pixels"
    with pytest.raises(OptionError, match="empty range"):
        family.image_options({"min_pixels": 9000, "max_pixels": 8000}, {})
    with pytest.raises(OptionError):
        family.image_options({"max_pixels": "big"}, {})


def test_embeds_grid(family):
    """Precomputed embeddings carry grid_thw: t = 1, h and w even, t·h·w/4 = their rows."""
    assert family.embeds_grid(12, [1, 6, 8]) == (1, 6, 8)
    assert family.embeds_grid(12, (1, 8, 6)) == (1, 8, 6)
    assert family.embeds_grid(12, torch.tensor([1, 6, 8])) == (1, 6, 8)
    for grid, match in [(None, "required"), ([1, 6], "three positive"), ([1, 6, "8"], "three positive"),
                        ([1, 0, 8], "three positive"), ([2, 6, 4], "t must be 1"), ([1, 5, 8], "multiples of 2"),
                        ([1, 6, 6], "9 rows, but the embeddings have 12")]:
        with pytest.raises(OptionError, match=match) as e:
            family.embeds_grid(12, grid)
        assert e.value.name == "grid_thw"


def test_server_range_from_the_environment(qdir, monkeypatch):
    monkeypatch.setenv("MAX_PIXELS", "100352")
    family = QwenVLFamily(qdir)
    assert family.max_pixels == 100352
    with pytest.raises(OptionError):
        family.image_options({"max_pixels": 200704}, {})


def test_v5_names_load_the_same_weights(qwen_checkpoints, qdir):
    a = load_family(qdir)
    b = load_family(qwen_checkpoints(a.config.kind, "v5", max_pixels=MAX_PIXELS))
    wa, wb = a.load_weights(progress=False), b.load_weights(progress=False)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
