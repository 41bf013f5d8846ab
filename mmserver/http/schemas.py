"""The /generate request schema (LightLLM's), parsed strictly into typed values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampling import SamplingParams
from ..frontend.errors import BadRequest

# parameter name → (type(s), default)
_PARAMS: dict[str, tuple[tuple[type, ...], Any]] = {
    "max_new_tokens": ((int,), 16),
    "do_sample": ((bool,), False),
    "temperature": ((int, float), 1.0),
    "top_p": ((int, float), 1.0),
    "top_k": ((int,), -1),
    "repetition_penalty": ((int, float), 1.0),
    "presence_penalty": ((int, float), 0.0),
    "frequency_penalty": ((int, float), 0.0),
    "ignore_eos": ((bool,), False),
    "min_new_tokens": ((int,), 1),
    "stop_sequences": ((list, str, type(None)), None),
    "seed": ((int, type(None)), None),
    "image_max_patch_num": ((int,), -1),
    # Qwen2-VL's pixel range for the request's images (-1: the server's); may only narrow it
    "min_pixels": ((int,), -1),
    "max_pixels": ((int,), -1),
    # The request's videos' sampling (-1: the model's default): a frame count, or frames per second
    "num_frames": ((int,), -1),
    "fps": ((int, float), -1),
    "return_details": ((bool,), False),
    "skip_special_tokens": ((bool,), True),
    "top_logprobs": ((int,), 0),  # alternatives per token in the details (0-20)
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs (see structured_spec)
    "response_format": ((dict, type(None)), None),
    "structured_outputs": ((dict, type(None)), None),
    # Accepted for LightLLM/TGI compatibility; only the value 1 makes sense here.
    "best_of": ((int,), 1),
    "n": ((int,), 1),
}

IMAGE_TYPES = ("base64", "url", "file", "embeds")
# Parameters handed to the model family as the request's image options (it validates them).
IMAGE_OPTIONS = ("image_max_patch_num", "min_pixels", "max_pixels", "num_frames", "fps")
VIDEO_TYPES = ("base64", "url", "file")


class ParamError(BadRequest):
    """A bad parameter value: `param` names it, `detail` says what is wrong ("must be …")."""

    def __init__(self, param: str, detail: str, message: str | None = None):
        super().__init__(message or f"parameter '{param}' {detail}")
        self.param = param
        self.detail = detail


@dataclass
class ImageSpec:
    type: str
    data: str
    options: dict[str, Any] = field(default_factory=dict)  # given with the image, for the model family
    where: str = ""  # the image's place in the request, to name a bad option
    kind: str = "image"  # or "video"


@dataclass
class GenerateRequest:
    inputs: str
    params: SamplingParams
    images: list[ImageSpec] = field(default_factory=list)
    image_options: dict[str, Any] = field(default_factory=dict)  # the request's, for the model family
    videos: list[ImageSpec] = field(default_factory=list)
    return_details: bool = False
    skip_special_tokens: bool = True
    input_ids: list[int] | None = None  # a prompt given as token ids (OpenAI completions): not tokenized again


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "integer", float: "number", bool: "boolean", list: "list of strings", str: "string",
             dict: "object", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def parse_parameters(raw: Any) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest("'parameters' must be an object")
    unknown = sorted(set(raw) - set(_PARAMS))
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)}")
    out = {}
    for name, (types, default) in _PARAMS.items():
        value = raw.get(name, default)
        # bool is an int subclass: refuse true/false where a number is expected, and vice versa.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise ParamError(name, f"must be a {_type_name(types)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamError(name, f"must be finite, got {value!r}")
        out[name] = value
    for name in ("best_of", "n"):
        if out[name] != 1:
            raise ParamError(name, f"must be 1, got {out[name]}")
    stops = out["stop_sequences"]
    out["stop_sequences"] = [stops] if isinstance(stops, str) else list(stops or [])
    if not all(isinstance(s, str) for s in out["stop_sequences"]):
        raise ParamError("stop_sequences", "must be a list of strings")
    return out


_RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def structured_spec(p: dict[str, Any]) -> dict[str, Any] | None:
    """The request's constraint (None: unconstrained), checked now without the tokenizer: a
    malformed spec, schema, regex or grammar is a ParamError naming the parameter and the problem.
    `response_format` {"type": "text"} is no constraint; it cannot be combined with `structured_outputs`."""
    fmt, vllm = p["response_format"], p["structured_outputs"]
    if fmt is not None:
        if fmt.get("type") not in _RESPONSE_FORMATS:
            raise ParamError("response_format", f"type must be one of {', '.join(map(repr, _RESPONSE_FORMATS))}, "
                                                f"got {fmt.get('type')!r}")
        if fmt["type"] == "text":
            fmt = None
    if fmt is not None and vllm is not None:
        raise ParamError("structured_outputs", "cannot be combined with a response_format that constrains the output")
    name, spec = ("response_format", fmt) if fmt is not None else ("structured_outputs", vllm)
    if spec is None:
        return None
    from ..structured import StructuredOutputError, build_grammar, parse_spec

    try:
        build_grammar(parse_spec(spec))  # cached: SamplingParams.validate and the router's compile reuse it
    except StructuredOutputError as e:
        raise ParamError(name, f"is invalid: {e}", f"parameter '{name}' is invalid: {e}") from None
    return spec


def sampling_params(p: dict[str, Any], stop_token_ids: list[int]) -> SamplingParams:
    structured = structured_spec(p)
    params = SamplingParams(
        max_new_tokens=p["max_new_tokens"], do_sample=p["do_sample"], temperature=float(p["temperature"]),
        top_p=float(p["top_p"]), top_k=p["top_k"], repetition_penalty=float(p["repetition_penalty"]),
        presence_penalty=float(p["presence_penalty"]), frequency_penalty=float(p["frequency_penalty"]),
        ignore_eos=p["ignore_eos"], min_new_tokens=p["min_new_tokens"], stop_sequences=p["stop_sequences"],
        seed=p["seed"], stop_token_ids=list(stop_token_ids), logprobs=True, top_logprobs=p["top_logprobs"],
        structured=structured)
    try:
        params.validate()
    except ValueError as e:  # SamplingParams names the field first: "<name> must be …"
        name, _, detail = str(e).partition(" ")
        raise ParamError(name, detail, f"parameter {e}") from None
    return params


def check_image_count(n: int, limit: int) -> None:
    if n > limit:
        raise BadRequest(f"{n} images given; at most {limit} are allowed per request")


def parse_images(mm: Any, limit: int, field_name: str = "images") -> list[ImageSpec]:
    """`multimodal_params.images` (or `.videos`): objects {"type", "data", options…}."""
    if mm is None:
        return []
    if not isinstance(mm, dict):
        raise BadRequest("'multimodal_params' must be an object")
    items = mm.get(field_name, [])
    if not isinstance(items, list):
        raise BadRequest(f"'multimodal_params.{field_name}' must be a list")
    video = field_name == "videos"
    if video:
        check_video_count(len(items), limit)
    else:
        check_image_count(len(items), limit)
    types = VIDEO_TYPES if video else IMAGE_TYPES
    out = []
    for i, item in enumerate(items):
        where = f"multimodal_params.{field_name}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("data"), str):
            raise BadRequest(f"{where} must be an object with a string 'data'")
        kind = item.get("type", "base64")
        if kind not in types:
            raise BadRequest(f"{where}.type {kind!r} is not one of {', '.join(types)}")
        # Other keys (e.g. max_pixels, max_dynamic_patch, num_frames; grid_thw of embeds) are
        # the item's options: the model family checks those it reads.
        out.append(ImageSpec(kind, item["data"], {k: v for k, v in item.items() if k not in ("type", "data")},
                             where=where, kind="video" if video else "image"))
    return out


def check_video_count(n: int, limit: int) -> None:
    if n > limit:
        raise BadRequest(f"{n} videos given; at most {limit} are allowed per request")


def parse_generate(body: Any, stop_token_ids: list[int], max_images: int, max_videos: int = 4) -> GenerateRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    inputs = body.get("inputs")
    if inputs is None:
        raise BadRequest("missing 'inputs'")
    if not isinstance(inputs, str):
        raise BadRequest("'inputs' must be a string")
    p = parse_parameters(body.get("parameters"))
    return GenerateRequest(inputs=inputs, params=sampling_params(p, stop_token_ids),
                           images=parse_images(body.get("multimodal_params"), max_images),
                           videos=parse_images(body.get("multimodal_params"), max_videos, "videos"),
                           image_options={k: p[k] for k in IMAGE_OPTIONS}, return_details=p["return_details"],
                           skip_special_tokens=p["skip_special_tokens"])
