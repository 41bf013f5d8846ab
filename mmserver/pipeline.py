"""Offline, in-process API in the style of LMDeploy's `pipeline()`.

    pipe = pipeline(model_dir, device="cpu", dtype="float32")
    r = pipe.generate("<image>\\nDescribe.", images=[img], gen_config=GenerationConfig(max_new_tokens=32))
    r = pipe(("describe this image", img))     # the model's chat template is applied

The model code and the engine are the ones the server's workers run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from .engine.engine import Engine, EngineConfig
from .engine.sampling import SamplingParams
from .frontend.detokenize import IncrementalDetokenizer
from .models.internvl.preprocess import load_image, preprocess_image
from .models.internvl.config import stop_token_ids
from .models.internvl.prompt import SpecialIds, build_input_ids, get_template, question_with_images
from .models.registry import load_model

IMAGE_TOKEN = "<image>"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    min_new_tokens: int = 1
    stop_sequences: list[str] = field(default_factory=list)
    seed: int | None = None
    image_max_patch_num: int = -1  # -1: the checkpoint's max_dynamic_patch
    skip_special_tokens: bool = True
    logprobs: bool = False

    def sampling_params(self, stop_token_ids: list[int]) -> SamplingParams:
        names = {f.name for f in fields(SamplingParams)}
        kwargs = {k: v for k, v in self.__dict__.items() if k in names}
        kwargs["stop_sequences"] = list(self.stop_sequences)
        kwargs["stop_token_ids"] = list(stop_token_ids)
        return SamplingParams(**kwargs)


@dataclass
class Response:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None

    @property
    def generate_token_len(self) -> int:  # LMDeploy's name
        return len(self.token_ids)

    @property
    def input_token_len(self) -> int:  # LMDeploy's name
        return self.prompt_tokens


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str, checkpoint_dtype: str) -> torch.dtype:
    """auto: float32 on CPU, the checkpoint's dtype on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device == "cpu" else _DTYPES.get(checkpoint_dtype, torch.bfloat16)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class Pipeline:
    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype = "auto",
                 engine_config: EngineConfig | None = None, progress: bool = True):
        from transformers import AutoTokenizer

        from .models.internvl.config import load_config

        self.model_dir = Path(model_dir)
        cfg = load_config(self.model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, cfg.torch_dtype)
        self.model = load_model(self.model_dir, device=self.device, dtype=self.dtype, progress=progress)
        self.cfg = self.model.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.special = SpecialIds.from_tokenizer(self.tokenizer)
        self.template = get_template(self.cfg.template)
        self.stop_token_ids = stop_token_ids(self.model_dir, self.tokenizer, self.cfg.llm.eos_token_ids)
        self.default_gen_config = GenerationConfig()
        self.engine = Engine(self.model.llm, engine_config or EngineConfig(), self.special.img_context,
                             encode_images=self.model.vision.encode)

    # ----------------------------------------------------------------------------------

    def prepare(self, prompt: str, images: Sequence[Any] = (), max_patches: int = -1) -> tuple[list[int], list[torch.Tensor]]:
        """Tokenize a raw prompt with `<image>` placeholders and preprocess its images."""
        cap = self.cfg.max_dynamic_patch if max_patches is None or max_patches < 0 else max(1, max_patches)
        pixels = [preprocess_image(load_image(img, i), max_num=cap, min_num=self.cfg.min_dynamic_patch,
                                   use_thumbnail=self.cfg.use_thumbnail)
                  for i, img in enumerate(images)]
        ids = build_input_ids(self.tokenizer, prompt, [p.shape[0] for p in pixels], self.model.tokens_per_tile,
                              self.special)
        return ids, pixels

    def generate(self, prompts: str | list[str], images: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
                 gen_config: GenerationConfig | None = None) -> Response | list[Response]:
        """Raw prompts (no chat template); one batch. A list of prompts takes a list of image lists."""
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if images is None:
            image_lists: list[Sequence[Any]] = [[] for _ in prompt_list]
        else:
            image_lists = [images] if single else list(images)  # type: ignore[list-item]
        if len(image_lists) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(image_lists)} image lists")
        results = self._run(prompt_list, image_lists, gen_config or self.default_gen_config)
        return results[0] if single else results

    def __call__(self, inputs: Any, gen_config: GenerationConfig | None = None) -> Response | list[Response]:
        """`(text, image)`, `(text, [images])`, a text, or a list of those; chat template applied."""
        batch = isinstance(inputs, list) and inputs and not isinstance(inputs[0], dict)
        items = inputs if batch else [inputs]
        prompts, image_lists = zip(*(self._chat_prompt(item) for item in items))
        results = self._run(list(prompts), list(image_lists), gen_config or self.default_gen_config)
        return results if batch else results[0]

    def _chat_prompt(self, item: Any) -> tuple[str, list[Any]]:
        if isinstance(item, str):
            text, imgs = item, []
        elif isinstance(item, tuple):
            text, imgs = item[0], item[1] if len(item) > 1 else []
            imgs = list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
        else:
            raise TypeError(f"unsupported input {type(item).__name__}; use text, (text, image) or (text, [images])")
        prompt = self.template.render([{"role": "user", "content": question_with_images(text, len(imgs))}],
                                      self.cfg.system_message)
        return prompt, imgs

    def _run(self, prompts: list[str], image_lists: list[Sequence[Any]], gen: GenerationConfig) -> list[Response]:
        params = gen.sampling_params(self.stop_token_ids)
        params.validate()
        pending: dict[int, dict[str, Any]] = {}
        try:
            for prompt, imgs in zip(prompts, image_lists):
                ids, pixels = self.prepare(prompt, imgs, gen.image_max_patch_num)
                rid = self.engine.add_request(ids, _copy_params(params), pixel_values=pixels or None)
                pending[rid] = {"prompt_tokens": len(ids), "ids": [], "logprobs": [], "reason": None,
                                "detok": IncrementalDetokenizer(self.tokenizer, gen.skip_special_tokens,
                                                                list(gen.stop_sequences))}
            order = list(pending)
            while any(p["reason"] is None for p in pending.values()):
                for out in self.engine.step():
                    p = pending[out.req_id]
                    p["ids"].append(out.token_id)
                    p["logprobs"].append(out.logprob)
                    p["detok"].push(out.token_id)
                    if p["detok"].stopped and not out.finished:
                        self.engine.abort(out.req_id, "stop")
                        p["reason"] = "stop"
                    elif out.finished:
                        p["reason"] = out.finish_reason
        finally:
            for rid in pending:  # an exception mid-batch must not leak KV slots
                self.engine.abort(rid)
        results = []
        for rid in order:
            p = pending[rid]
            detok = p["detok"]
            if not detok.stopped:
                detok.flush()
            results.append(Response(detok.text, p["ids"], p["reason"], p["prompt_tokens"],
                                    p["logprobs"] if gen.logprobs else None))
        return results


def _copy_params(params: SamplingParams) -> SamplingParams:
    return SamplingParams(**{f.name: getattr(params, f.name) for f in fields(SamplingParams)})


def pipeline(model_dir: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype = "auto",
             **engine_kwargs: Any) -> Pipeline:
    """Load a checkpoint for in-process generation. Extra keyword arguments set EngineConfig fields."""
    return Pipeline(model_dir, device=device, dtype=dtype,
                    engine_config=EngineConfig(**engine_kwargs) if engine_kwargs else None)
