"""Greedy output equals transformers' InternVLForConditionalGeneration token for token
(float32, CPU, same random weights), alone and batched, for both checkpoint layouts."""

from __future__ import annotations

import pytest
import torch

from mmserver import GenerationConfig, pipeline
from mmserver.models.internvl.preprocess import normalize_pixels, preprocess_image, tile_pixels

from hf_reference import hf_greedy, hf_image_features, hf_inputs, hf_pixel_values

N_NEW = 12
GREEDY = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen_dirs(checkpoints):
    return checkpoints("original", "qwen2"), checkpoints("hf", "qwen2")


@pytest.fixture(scope="module")
def pipe(qwen_dirs):
    return pipeline(qwen_dirs[0], device="cpu", dtype="float32", max_total_tokens=32768, max_req_len=8192)


def _reference(hf_dir, prompt, images, max_patches=12) -> tuple[list[int], list[int]]:
    """transformers' prompt ids (its processor) and greedy tokens: nothing of ours on this side."""
    ids, hf_pixels = hf_inputs(hf_dir, prompt, images, max_patches)
    return ids, hf_greedy(hf_dir, ids, hf_pixels, N_NEW)


CASES = {
    "text_only": ("<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n", []),
    "one_448": ("<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n", [(448, 448, 1)]),
    "one_640x480_13_tiles": ("<image>\nDescribe the picture in detail.", [(640, 480, 2)]),
    "two_images": ("Image-1: <image>\nImage-2: <img></img>\nCompare them.", [(300, 900, 3), (1280, 720, 4)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case, pipe, qwen_dirs, image_factory):
    prompt, specs = CASES[case]
    images = [image_factory(w, h, s) for w, h, s in specs]
    hf_ids, expected = _reference(qwen_dirs[1], prompt, images)
    got = pipe.generate(prompt, images=images, gen_config=GREEDY)
    assert got.token_ids == expected
    assert got.finish_reason == "length"
    assert got.prompt_tokens == len(hf_ids)


def test_thirteen_tiles_for_640x480(pipe, image_factory):
    ids, pixels = pipe.prepare("<image>\nhi", [image_factory(640, 480)])
    assert pixels[0].shape == (13, 3, 448, 448)
    assert ids.count(pipe.family.special.img_context) == 13 * 256


def test_per_request_tile_cap(pipe, qwen_dirs, image_factory):
    prompt = "<image>\nDescribe."
    image = image_factory(640, 480, 5)
    hf_ids, expected = _reference(qwen_dirs[1], prompt, [image], max_patches=6)
    cfg = GenerationConfig(max_new_tokens=N_NEW, ignore_eos=True, image_max_patch_num=6)
    got = pipe.generate(prompt, images=[image], gen_config=cfg)
    assert pipe.prepare(prompt, [image], 6)[1][0].shape[0] == 7  # (3,2) grid + thumbnail
    assert got.token_ids == expected and got.prompt_tokens == len(hf_ids)
    uncapped = pipe.generate(prompt, images=[image], gen_config=GREEDY)
    assert uncapped.prompt_tokens - got.prompt_tokens == (13 - 7) * 256


def test_batch_equals_alone(pipe, image_factory):
    prompts = [CASES[c][0] for c in CASES]
    images = [[image_factory(w, h, s) for w, h, s in CASES[c][1]] for c in CASES]
    alone = [pipe.generate(p, images=i, gen_config=GREEDY).token_ids for p, i in zip(prompts, images)]
    together = pipe.generate(prompts, images=images, gen_config=GREEDY)
    assert [r.token_ids for r in together] == alone
    assert pipe.engine.kv.used == 0  # every slot came back


def test_vit_features_match_transformers(pipe, qwen_dirs, image_factory):
    pixels = preprocess_image(image_factory(640, 480, 7), max_num=12)
    ours = pipe.model.vision.encode(pixels)
    ref = hf_image_features(qwen_dirs[1], pixels)
    assert ours.shape == ref.shape == (13, 256, pipe.cfg.llm.hidden_size)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_vit_takes_raw_uint8_tiles(pipe, image_factory):
    """The server's ViT workers send uint8 tiles and normalise on the device: same embeddings."""
    image = image_factory(640, 480, 7)
    raw = tile_pixels(image, max_num=12)
    assert raw.dtype == torch.uint8 and raw.shape == (13, 448, 448, 3)
    assert torch.equal(normalize_pixels(raw), preprocess_image(image, max_num=12))
    vision = pipe.model.vision
    assert torch.equal(vision.encode(raw), vision.encode(preprocess_image(image, max_num=12)))


def test_layouts_give_identical_outputs(pipe, qwen_dirs, image_factory):
    hf_pipe = pipeline(qwen_dirs[1], device="cpu", dtype="float32")
    assert hf_pipe.cfg.layout == "hf" and pipe.cfg.layout == "original"
    prompt, specs = CASES["two_images"]
    images = [image_factory(w, h, s) for w, h, s in specs]
    a = pipe.generate(prompt, images=images, gen_config=GREEDY)
    b = hf_pipe.generate(prompt, images=images, gen_config=GREEDY)
    assert a.token_ids == b.token_ids
    assert a.text == b.text


def test_v5_key_spelling_loads(checkpoints, pipe, image_factory):
    v5 = pipeline(checkpoints("hf", "qwen2", hf_key_style="v5"), device="cpu", dtype="float32")
    prompt, specs = CASES["one_448"]
    images = [image_factory(w, h, s) for w, h, s in specs]
    assert v5.generate(prompt, images=images, gen_config=GREEDY).token_ids == \
        pipe.generate(prompt, images=images, gen_config=GREEDY).token_ids


def test_internlm2_matches_llama_reference(checkpoints, image_factory):
    """InternLM2 (grouped wqkv, its own names, BOS) against the LLaMA conversion in transformers."""
    original = checkpoints("original", "internlm2")
    llama_hf = checkpoints("hf", "internlm2")
    p = pipeline(original, device="cpu", dtype="float32")
    assert p.cfg.llm.model_type == "internlm2" and p.cfg.template == "internlm2-chat"
    image = image_factory(800, 600, 9)
    prompt = "<|im_start|>user\n<image>\nWhat do you see?<|im_end|><|im_start|>assistant\n"
    ids, pixels = p.prepare(prompt, [image], 4)
    assert ids[0] == 1  # InternLM2 tokenizers add BOS
    hf_pixels, _ = hf_pixel_values([image], 4)
    expected = hf_greedy(llama_hf, ids, hf_pixels, N_NEW)
    got = p.generate(prompt, images=[image], gen_config=GenerationConfig(max_new_tokens=N_NEW, ignore_eos=True,
                                                                        image_max_patch_num=4))
    assert got.token_ids == expected
    # The transformers layout of the same weights, read by us as a LLaMA backbone.
    llama = pipeline(llama_hf, device="cpu", dtype="float32")
    assert llama.cfg.llm.model_type == "llama" and llama.cfg.template == "internlm2-chat"
    again = llama.generate(prompt, images=[image], gen_config=GenerationConfig(max_new_tokens=N_NEW, ignore_eos=True,
                                                                              image_max_patch_num=4))
    assert again.token_ids == expected


def test_vit_6b_style_matches_transformers(checkpoints, image_factory):
    """RMSNorm + q/k norm over the full width (InternViT-6B style)."""
    original = checkpoints("original", "qwen2", vit="6b")
    hf_dir = checkpoints("hf", "qwen2", vit="6b")
    p = pipeline(original, device="cpu", dtype="float32")
    assert p.cfg.vision.qk_norm and p.cfg.vision.norm_type == "rms_norm"
    pixels = preprocess_image(image_factory(900, 500, 11), max_num=3)
    torch.testing.assert_close(p.model.vision.encode(pixels), hf_image_features(hf_dir, pixels), atol=1e-4, rtol=0)
    prompt = "<image>\nWhat is it?"
    image = image_factory(448, 448, 12)
    ids, _ = p.prepare(prompt, [image])
    expected = hf_greedy(hf_dir, ids, hf_pixel_values([image])[0], N_NEW)
    assert p.generate(prompt, images=[image], gen_config=GREEDY).token_ids == expected
