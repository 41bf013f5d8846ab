"""Greedy ids (and logprobs within 1e-3) through `pipeline()` equal transformers'
Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration on tiny random
checkpoints of both (float32, CPU).

The oracle builds its own inputs, as the reference notes say (no AutoProcessor without
torchvision): the checkpoint's chat template (transformers' jinja), the PIL image processor,
each `<|image_pad|>` expanded to prod(grid) / 4 copies, and `mm_token_type_ids`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from conftest import random_image
from mmserver import GenerationConfig, pipeline

from hf_reference import hf_generate_with_logprobs

N_NEW = 8
MAX_PIXELS = 28 * 28 * 256  # the tiny checkpoints' range: [3136, 200704] (a large image gets capped)
IMAGE_PAD = 151655


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qdir(request, qwen_checkpoints):
    return qwen_checkpoints(request.param, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def pipe(qdir):
    return pipeline(qdir, device="cpu", dtype="float32", max_total_tokens=8192, max_req_len=4096)


@lru_cache(maxsize=2)
def _hf(model_dir: str):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    return (AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


@torch.inference_mode()
def hf_generate(model_dir, messages=None, images=(), max_pixels=MAX_PIXELS, prompt=None, n_new=N_NEW):
    """transformers' greedy tokens and their logprobs, and the prompt ids it built."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model, tok = _hf(str(model_dir))
    text = prompt if prompt is not None else tok.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)
    kwargs = {}
    if images:
        proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)(images=list(images),
                                                                                   return_tensors="pt")
        parts = text.split("<|image_pad|>")
        assert len(parts) == len(images) + 1
        counts = [int(g.prod()) // 4 for g in proc["image_grid_thw"]]
        text = parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, parts[1:]))
        kwargs = {"pixel_values": proc["pixel_values"], "image_grid_thw": proc["image_grid_thw"]}
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if images:
        kwargs["mm_token_type_ids"] = (ids == IMAGE_PAD).int()
    return hf_generate_with_logprobs(model, ids, n_new, **kwargs)


def _gen(**kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=N_NEW, ignore_eos=True, logprobs=True, **kw)


def _check(got, expected):
    tokens, logprobs, ids = expected
    assert got.prompt_tokens == len(ids)
    assert got.token_ids == tokens
    np.testing.assert_allclose(got.logprobs, logprobs, atol=1e-3, rtol=0)


def _user(*parts):
    return [{"role": "user", "content": [{"type": "image"} if isinstance(p, tuple) else {"type": "text", "text": p}
                                         for p in parts]}]


CASES = {
    "text_only": ["Write a haiku about the sea."],
    "odd_sides": [(230, 150, 1), "What is this?"],  # 230×150: sides not multiples of 28
    "below_min_pixels": [(20, 30, 2), "Describe it."],  # resized up to >= 3136 pixels
    "capped_by_max_pixels": [(900, 700, 3), "Describe the picture in detail."],
    "two_images": ["Compare ", (230, 150, 4), " with ", (120, 310, 5), "."],
    "image_then_long_text": [(300, 250, 6), " ".join(["The quick brown fox jumps over the lazy dog."] * 30)],
}


def _images(parts):
    return [random_image(w, h, s) for w, h, s in (p for p in parts if isinstance(p, tuple))]


@pytest.mark.parametrize("case", list(CASES))
def test_chat_matches_transformers(case, pipe, qdir):
    parts = CASES[case]
    images = _images(parts)
    messages = _user(*parts)
    openai = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": img}} if isinstance(p, tuple) else {"type": "text", "text": p}
        for p, img in zip(parts, _with_images(parts, images))]}]
    got = pipe(openai, _gen())
    _check(got, hf_generate(qdir, messages, images))


def _with_images(parts, images):
    it = iter(images)
    return [next(it) if isinstance(p, tuple) else None for p in parts]


def test_tuple_input_and_window_attention(pipe, qdir):
    """(text, image): the image goes before the text, as an image part does. 300×250 → a 10×9
    merged grid: Qwen2.5-VL runs 3×3 windows, 5 of them partial."""
    image = random_image(300, 250, 7)
    got = pipe(("What do you see?", image), _gen())
    _check(got, hf_generate(qdir, _user((0,), "What do you see?"), [image]))


def test_request_max_pixels(pipe, qdir):
    image = random_image(640, 480, 8)
    cap = 28 * 28 * 64
    got = pipe(("Describe.", image), _gen(max_pixels=cap))
    expected = hf_generate(qdir, _user((0,), "Describe."), [image], max_pixels=cap)
    _check(got, expected)
    assert expected[2].count(IMAGE_PAD) <= 64
    assert pipe(("Describe.", image), _gen()).prompt_tokens > got.prompt_tokens


def test_raw_prompt_with_placeholders(pipe, qdir):
    images = [random_image(230, 150, 9), random_image(100, 100, 10)]
    prompt = "<|im_start|>user\n<image>first, then <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    got = pipe.generate(prompt, images=images, gen_config=_gen())
    _check(got, hf_generate(qdir, images=images, prompt=prompt.replace("<image>", "<|vision_start|><|image_pad|>"
                                                                                  "<|vision_end|>")))


@pytest.mark.parametrize("chunk", [37, 64])
def test_chunked_prefill_cuts_an_image(qdir, chunk):
    """A prefill chunk boundary inside an image's tokens (and inside later text)."""
    p = pipeline(qdir, device="cpu", dtype="float32", max_total_tokens=8192, max_req_len=4096,
                 batch_max_tokens=chunk)
    parts = CASES["two_images"]
    images = _images(parts)
    got = p(_user_openai(parts, images), _gen())
    _check(got, hf_generate(qdir, _user(*parts), images))


def _user_openai(parts, images):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": img}} if isinstance(p, tuple) else {"type": "text", "text": p}
        for p, img in zip(parts, _with_images(parts, images))]}]


def test_batch_equals_alone(pipe):
    """M-RoPE requests batched with each other and with a text-only one (P = 1 and P = 3 rows in
    one forward) give the tokens they give alone."""
    inputs = [("What is this?", random_image(230, 150, 11)), "Hello there.",
              ("And this?", [random_image(120, 310, 12), random_image(60, 60, 13)])]
    alone = [pipe(x, _gen()).token_ids for x in inputs]
    assert [r.token_ids for r in pipe(inputs, _gen())] == alone
    assert pipe.engine.kv.used == 0

