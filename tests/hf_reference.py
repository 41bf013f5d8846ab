"""The transformers reference: InternVLForConditionalGeneration on the same weights, float32."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=4)
def hf_model(model_dir: str):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_pixel_values(images, max_patches: int = 12) -> tuple[torch.Tensor, list[int]]:
    """Tiles made by transformers' own image processor (independent of our preprocessing)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=max_patches,
                                    size={"height": 448, "width": 448},
                                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    out = proc(images=list(images), return_tensors="pt")
    return out["pixel_values"], [int(n) for n in out["num_patches"]]


def hf_processor(model_dir: str | Path, max_patches: int = 12):
    """transformers' InternVLProcessor over the checkpoint's tokenizer and the GotOCR2 image
    processor (the PIL one: no torchvision here): prompt ids and tiles made without our code."""
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # What the released tokenizer configs declare for InternVL (the tiny one does not).
    for name, token in {"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}.items():
        setattr(tok, name, token)
        setattr(tok, name + "_id", tok.convert_tokens_to_ids(token))
    images = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=max_patches,
                                      size={"height": 448, "width": 448},
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])

    class Processor(InternVLProcessor):
        def check_argument_for_proper_class(self, name, arg):  # its class lookup needs torchvision
            return type(arg)

    return Processor(image_processor=images, tokenizer=tok, image_seq_length=256)


def hf_inputs(model_dir: str | Path, prompt: str, images, max_patches: int = 12) -> tuple[list[int], torch.Tensor | None]:
    """Prompt ids and pixel values as transformers makes them; `<image>` and `<img></img>` mark
    images (transformers marks an image's place with the context token itself)."""
    text = prompt.replace("<img></img>", "<IMG_CONTEXT>").replace("<image>", "<IMG_CONTEXT>")
    if not images:
        return list(hf_processor(model_dir, max_patches).tokenizer(text)["input_ids"]), None
    out = hf_processor(model_dir, max_patches)(text=text, images=list(images), return_tensors="pt")
    return out["input_ids"][0].tolist(), out["pixel_values"]


@torch.inference_mode()
def hf_greedy(model_dir: str | Path, input_ids: list[int], pixel_values: torch.Tensor | None,
              max_new_tokens: int) -> list[int]:
    """Greedy tokens from transformers' generate, never stopping early on EOS."""
    from transformers import GenerationConfig

    model = hf_model(str(model_dir))
    ids = torch.tensor([input_ids], dtype=torch.long)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                           eos_token_id=None, pad_token_id=0, bos_token_id=None)
    kwargs = {"pixel_values": pixel_values} if pixel_values is not None else {}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg, **kwargs)
    return out[0, len(input_ids):].tolist()


@torch.inference_mode()
def hf_image_features(model_dir: str | Path, pixel_values: torch.Tensor) -> torch.Tensor:
    model = hf_model(str(model_dir))
    out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    return out.pooler_output


@torch.inference_mode()
def hf_generate_with_logprobs(model, ids: torch.Tensor, n_new: int, **kwargs) -> tuple[list[int], list[float], list[int]]:
    """A Qwen2-VL model's greedy tokens for prompt `ids` [1, L] (never stopping early), their raw
    logprobs and the prompt ids; `kwargs` are its image/video inputs (with mm_token_type_ids)."""
    model.model.rope_deltas = None  # cached on the model between calls
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
                         min_new_tokens=n_new, eos_token_id=None, pad_token_id=151643, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    new = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, new)]
    return new, logprobs, ids[0].tolist()
