"""Greedy ids through `pipeline()` equal transformers' LlavaForConditionalGeneration (LLaVA-1.5)
and LlavaNextForConditionalGeneration (LLaVA-NeXT, Vicuna and Mistral backbones) on tiny random
checkpoints (float32, CPU), and the processors' token counts from the image size alone.

The oracle is transformers' own processor (LlavaProcessor / LlavaNextProcessor over the PIL
image processors, no torchvision) fed the checkpoint's chat template rendered by transformers.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from conftest import random_image
from mmserver import GenerationConfig, pipeline

N_NEW = 8
PAD = 32001

VARIANTS = {"llava": ("llava", "vicuna"), "next_vicuna": ("llava_next", "vicuna"),
            "next_mistral": ("llava_next", "mistral")}


@pytest.fixture(scope="module", params=list(VARIANTS))
def ldir(request, llava_checkpoints):
    return llava_checkpoints(*VARIANTS[request.param])


@pytest.fixture(scope="module")
def lpipe(ldir):
    return pipeline(ldir, device="cpu", dtype="float32", max_total_tokens=16384, max_req_len=8192)


@lru_cache(maxsize=1)
def _hf(model_dir: str):
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    next_ = model.config.model_type == "llava_next"
    ip = (LlavaNextImageProcessorPil if next_ else LlavaImageProcessorPil).from_pretrained(model_dir)
    proc = (LlavaNextProcessor if next_ else LlavaProcessor)(
        image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    return model, tok, proc


@torch.inference_mode()
def hf_generate(model_dir, messages=None, images=(), prompt=None, n_new=N_NEW):
    """transformers' greedy tokens, and the prompt ids its processor built."""
    model, tok, proc = _hf(str(model_dir))
    text = prompt if prompt is not None else tok.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)
    inputs = proc(text=text, images=list(images) or None, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None,
                         pad_token_id=PAD)
    ids = inputs["input_ids"][0].tolist()
    return out[0, len(ids):].tolist(), ids


def _gen(**kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=N_NEW, ignore_eos=True, **kw)


def _user(*parts):
    return [{"role": "user", "content": [{"type": "image"} if isinstance(p, tuple) else {"type": "text", "text": p}
                                         for p in parts]}]


def _openai(parts, images):
    it = iter(images)
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": next(it)}} if isinstance(p, tuple) else {"type": "text", "text": p}
        for p in parts]}]


CASES = {
    "text_only": ["Write a haiku about the sea."],
    "square": [(400, 400, 1), "What is this?"],
    "wide": [(900, 300, 2), "Describe the picture."],  # NeXT: 336x1008-ish grids
    "tall": [(250, 700, 3), "What do you see?"],
    "two_images": [(230, 150, 4), (120, 310, 5), "Compare them."],
}


def _images(parts):
    return [random_image(w, h, s) for w, h, s in (p for p in parts if isinstance(p, tuple))]


@pytest.mark.parametrize("case", list(CASES))
def test_chat_matches_transformers(case, lpipe, ldir):
    parts = CASES[case]
    images = _images(parts)
    got = lpipe(_openai(parts, images), _gen())
    tokens, ids = hf_generate(ldir, _user(*parts), images)
    assert got.prompt_tokens == len(ids)
    assert got.token_ids == tokens


def test_prompt_ids_and_tuple_input(lpipe, ldir):
    """(text, images): the images go first, as image parts do; the ids are the processor's."""
    images = [random_image(640, 480, 6)]
    ids, pixels = lpipe.prepare(lpipe.family.render_chat(_user((0,), "Hi.")), images)
    _, want = hf_generate(ldir, _user((0,), "Hi."), images, n_new=1)
    assert ids == want
    got = lpipe(("What is it?", images[0]), _gen())
    assert got.token_ids == hf_generate(ldir, _user((0,), "What is it?"), images)[0]


@pytest.mark.parametrize("size", [(1, 1), (20, 30), (336, 336), (337, 335), (672, 336), (1000, 200), (200, 1000),
                                  (1920, 1080), (555, 777), (100, 2000)])
def test_token_count_from_size(ldir, size):
    """plan_image (the size alone, as the HTTP intake knows it) = the processor's count = preprocess's."""
    from mmserver.models.registry import load_family

    fam = load_family(ldir)
    _, _, proc = _hf(str(ldir))
    w, h = size
    img = random_image(w, h, 7)
    inputs = proc(text="<image>", images=[img], return_tensors="pt")
    want = inputs["input_ids"][0].tolist().count(fam.config.image_token_id)
    opts = fam.image_options({}, {})
    assert fam.plan_image(w, h, opts).n_tokens == want
    x = fam.preprocess(img, opts, normalize=True)
    assert x.n_tokens == want
    np.testing.assert_array_equal(x.pixels.numpy(), inputs["pixel_values"][0].numpy()[:x.pixels.shape[0]]
                                  if fam.config.kind == "llava_next" else inputs["pixel_values"].numpy())


def test_raw_prompt(lpipe, ldir):
    images = [random_image(300, 200, 8), random_image(64, 64, 9)]
    prompt = "USER: <image>\nfirst, then <image>\nsecond ASSISTANT:"
    got = lpipe.generate(prompt, images=images, gen_config=_gen())
    tokens, ids = hf_generate(ldir, images=images, prompt=prompt)
    assert got.prompt_tokens == len(ids) and got.token_ids == tokens


def test_batch_equals_alone(lpipe):
    inputs = [("What is this?", random_image(230, 150, 11)), "Hello there.",
              ("And this?", [random_image(120, 310, 12), random_image(60, 60, 13)])]
    alone = [lpipe(x, _gen()).token_ids for x in inputs]
    assert [r.token_ids for r in lpipe(inputs, _gen())] == alone
    assert lpipe.engine.kv.used == 0
