"""Offline, in-process API in the style of LMDeploy's `pipeline()`.

    pipe = pipeline(model_dir, device="cpu", dtype="float32")
    pipe(("describe this image", img)).text            # the model's chat template is applied
    pipe(("compare them", [img1, img2]))               # "Image-1: <image>\\nImage-2: <image>\\n…"
    pipe([("a", img1), "text only"])                   # a batch (with a progress bar)
    pipe([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                       {"type": "text", "text": "describe"}]}])   # OpenAI messages
    sess = pipe.chat(("describe", img)); sess = pipe.chat("and the colors?", session=sess)
    for out in pipe.stream_infer(("describe", img)): print(out.text, end="")
    pipe.generate("<image>\\nDescribe.", images=[img])  # a raw prompt: no template
    pipe(("what happens?", Video("clip.mp4", num_frames=8)))            # a video (bytes, path, URL, frames)
    pipe.generate("<video>What happens?", images=[Video(frames, fps=2.0)])  # PIL frames already sampled

LMDeploy's options (`mmserver.messages`) are accepted as they are:

    pipe = pipeline(model_dir, backend_config=TurbomindEngineConfig(session_len=8192, max_batch_size=16),
                    chat_template_config=ChatTemplateConfig(model_name="llava-v1", system="Be brief."),
                    vision_config=VisionConfig(max_batch_size=8))

An image is a PIL image, a path, bytes, an http(s) or `data:image/…;base64,` URL, or a
`[n_tokens, hidden]` embeddings tensor (torch, or any DLPack tensor) that stands in for it
(see `frontend/embeds.py`); Qwen2-VL's embeddings carry their grid: `(tensor, [t, h, w])` or
`{"embeds": tensor, "grid_thw": [t, h, w]}`. The model code and the engine are the ones the server's
workers run.

A `Video` is file bytes, a path, an http(s) or `data:video/…;base64,` URL, or a list of PIL
frames already sampled (each used once; `fps`: the rate they were sampled at). Its options
(`num_frames` or `fps`, and the family's, e.g. Qwen2-VL's `max_pixels`) are as the server's
`video_url`; `<video>` marks its place in a raw prompt. Videos and images share the
`images` lists: each is matched to the next placeholder of its own kind.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .engine.engine import Engine, EngineConfig, StepOutput
from .engine.sampling import SamplingParams
from .frontend import embeds as embeds_io
from .frontend.detokenize import IncrementalDetokenizer
from .messages import ChatTemplateConfig, EngineOptions, VisionConfig
from .models import video_frames
from .models.errors import ImageError, OptionError, PromptError
from .models.family import ImagePlan, LoadedModel, ModelFamily, Span, VideoLimits, VisionInput
from .models.registry import load_family

IMAGE_TOKEN = ModelFamily.image_placeholder  # "<image>": place images yourself in the text of (text, images)
URL_TIMEOUT_S = 10.0

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# generation_config.json fields that set this pipeline's default GenerationConfig
_CHECKPOINT_DEFAULTS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


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
    image_max_patch_num: int = -1  # -1: the model's default (an image option: the model family reads it)
    # Qwen2-VL's image options: a pixel range within the server's (None: the server's)
    min_pixels: int | None = None
    max_pixels: int | None = None
    # The videos' sampling when a Video sets none: a frame count, or frames per second (one of them)
    num_frames: int | None = None
    fps: float | None = None
    skip_special_tokens: bool = True
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token (0-20), in Response.top_logprobs: [(id, logprob), ...]
    # Structured output: an OpenAI response_format or vLLM structured_outputs dict (see README)
    structured: dict | None = None

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> "GenerationConfig":
        """The defaults, with the sampling fields the checkpoint's generation_config.json sets
        (as transformers does: a temperature there without `do_sample: true` stays greedy)."""
        path = Path(model_dir) / "generation_config.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        return cls(**{k: raw[k] for k in _CHECKPOINT_DEFAULTS if raw.get(k) is not None})

    def image_options(self) -> dict[str, Any]:
        """The request's image options, for the model family (each reads its own)."""
        out: dict[str, Any] = {"image_max_patch_num": self.image_max_patch_num}
        out.update({k: v for k in ("min_pixels", "max_pixels", "num_frames", "fps")
                    if (v := getattr(self, k)) is not None})
        return out

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
    finish_reason: str | None
    prompt_tokens: int
    logprobs: list[float] | None = None
    index: int = 0  # which input of a batch
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, with GenerationConfig.top_logprobs
    prompt_cache_len: int = 0  # prompt tokens whose KV came from the prefix cache (LightLLM's name)

    @property
    def generate_token_len(self) -> int:  # LMDeploy's name
        return len(self.token_ids)

    @property
    def input_token_len(self) -> int:  # LMDeploy's name
        return self.prompt_tokens


@dataclass
class StreamResponse:
    """One step of `stream_infer` for one input: what is new since that input's last step."""

    text: str  # new text (may be "" while a character or a possible stop string is incomplete)
    token_ids: list[int]  # new token ids
    finish_reason: str | None  # None until the input's last step
    index: int  # which input
    prompt_tokens: int
    generated_tokens: int  # so far, this step included
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_cache_len: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class Message:
    """One chat turn: content parts for the chat template, and the images they place."""

    role: str
    parts: list[dict]  # {"type": "text", "text": ...} | {"type": "image"} (rendered "<image>\n")
    images: list["ImageInput"] = field(default_factory=list)


class Video:
    """A video input: file bytes, a path, an http(s) / data: URL, or a list of PIL frames
    already sampled. `num_frames` or `fps` choose the frames (the family's rule); other
    keywords are the family's options (Qwen2-VL: min_pixels / max_pixels)."""

    def __init__(self, source: Any, num_frames: int | None = None, fps: float | None = None, **options: Any):
        self.source = source
        self.options = {**options, **{k: v for k, v in (("num_frames", num_frames), ("fps", fps)) if v is not None}}

    def __repr__(self) -> str:
        what = f"{len(self.source)} frames" if isinstance(self.source, (list, tuple)) else type(self.source).__name__
        return f"Video({what}, {self.options})"


@dataclass
class ImageInput:
    source: Any  # PIL image, path, bytes, URL, or an embeddings tensor; a video's source
    options: dict = field(default_factory=dict)  # given with the image (e.g. max_dynamic_patch), for the family
    kind: str = "image"  # or "video"

    @classmethod
    def of(cls, x: Any) -> "ImageInput":
        if isinstance(x, ImageInput):
            return x
        if isinstance(x, Video):
            return cls(x.source, dict(x.options), "video")
        return cls(x)


@dataclass
class Session:
    """A multi-turn conversation for `Pipeline.chat`: every turn (images included) and the
    last response."""

    messages: list[Message] = field(default_factory=list)
    response: Response | None = None


@dataclass
class _Visual:
    n_tokens: int
    input: VisionInput | None = None  # an image, as its family's encoder takes it; encoded before it runs
    embeds: torch.Tensor | None = None  # [n_tokens, hidden] given by the caller
    key: str = ""  # content identity for the prefix cache: a digest of what the encoder (or the LLM) gets
    grid: tuple[int, ...] = ()  # the family's grid for the positions (Qwen2-VL: grid_thw; a video's plan grid)
    plan: ImagePlan | None = None  # a video's plan (its spans)


@dataclass
class _Prepared:
    ids: list[int]
    spans: list[Span]
    visuals: list[_Visual]  # in prompt order
    keys: list[str] = field(default_factory=list)  # per span: its input's prefix-cache identity


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
                 engine_config: EngineConfig | None = None, progress: bool = True,
                 backend_config: EngineOptions | None = None, chat_template_config: ChatTemplateConfig | None = None,
                 vision_config: VisionConfig | None = None):
        from .args import env_int
        from .models.chat_templates import ChatOverride

        self.model_dir = Path(model_dir)
        self.family = load_family(self.model_dir)
        if chat_template_config is not None:
            self.family.chat_override = ChatOverride(chat_template_config.model_name, chat_template_config.system)
        self.session_len = backend_config.session_len if backend_config is not None else None
        self.vision_batch = vision_config.max_batch_size if vision_config is not None else 0
        self.cfg = self.family.config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, self.cfg.torch_dtype)
        self.progress = progress
        workers = env_int("LOADWORKER") or 1
        self._tp = None
        if backend_config is not None and backend_config.tp > 1:  # rank 0 here, followers spawned
            from .pipeline_tp import TPRanks

            vision = self.family.load_model(self.device, self.dtype, components=("vision",), progress=progress,
                                            workers=workers).vision  # unsharded, in this process
            self._tp = TPRanks(self.model_dir, backend_config.tp, self.device, self.dtype, backend_config,
                               engine_config, workers)
            self.model = LoadedModel(self.family, vision, self._tp.llm)
        else:
            self.model = self.family.load_model(self.device, self.dtype, progress=progress, workers=workers)
        self.tokenizer = self.family.tokenizer
        self.stop_token_ids = self.family.stop_token_ids()
        self.default_gen_config = GenerationConfig.from_model_dir(self.model_dir)
        self.fetch_timeout = URL_TIMEOUT_S
        self.video_limits = VideoLimits()
        if self._tp is not None:  # rank 0's Engine sends each batch to the followers first
            self.engine = Engine(self._tp.leader, self._tp.engine_config, tokenizer=self.tokenizer)
        else:
            if backend_config is not None:
                engine_config = _engine_config(backend_config, engine_config, self.model.llm, self.device)
            self.engine = Engine(self.model.llm, engine_config or EngineConfig(), tokenizer=self.tokenizer)

    def close(self) -> None:
        """Stop the tensor-parallel follower processes (tp > 1; also on garbage collection and at
        exit). A no-op for tp=1; idempotent."""
        if self._tp is not None:
            self._tp.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------
    # Public API

    def __call__(self, inputs: Any, gen_config: GenerationConfig | None = None) -> Response | list[Response]:
        """`text`, `(text, image)`, `(text, [images])` or OpenAI-format messages (one
        conversation), or a list of those (a batch); the model's chat template is applied."""
        batch = _is_batch(inputs)
        items = inputs if batch else [inputs]
        gen = gen_config or self.default_gen_config
        results = self._collect(self._submit([self._render(_conversation(x)) for x in items], gen), gen,
                                progress_total=len(items) if batch else None)
        return results if batch else results[0]

    def stream_infer(self, inputs: Any, gen_config: GenerationConfig | None = None) -> Iterator[StreamResponse]:
        """As `__call__`, but yields each generated token's `StreamResponse` as it comes
        (inputs of a batch interleave; `.index` says which)."""
        items = inputs if _is_batch(inputs) else [inputs]
        gen = gen_config or self.default_gen_config
        return self._submit([self._render(_conversation(x)) for x in items], gen)

    def chat(self, prompt: str | tuple, session: Session | None = None,
             gen_config: GenerationConfig | None = None) -> Session:
        """One more turn of a conversation: `prompt` is `text` or `(text, images)`. Returns
        the session (updated in place), whose `.response` is this turn's answer."""
        session = session if session is not None else Session()
        messages = session.messages + _conversation(prompt)
        gen = gen_config or self.default_gen_config
        response = self._collect(self._submit([self._render(messages)], gen), gen)[0]
        session.messages = messages + [Message("assistant", [{"type": "text", "text": response.text}])]
        session.response = response
        return session

    def generate(self, prompts: str | list[str], images: Sequence[Any] | Sequence[Sequence[Any]] | None = None,
                 gen_config: GenerationConfig | None = None) -> Response | list[Response]:
        """Raw prompts (no chat template); one batch. A list of prompts takes a list of image lists."""
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if images is None:
            image_lists: list[Sequence[Any]] = [[] for _ in prompt_list]
        else:
            image_lists = [images] if single else list(images)  # type: ignore[list-item]
            if single and _is_embeds_pair(images):  # (tensor, grid_thw): one image
                image_lists = [[images]]
        if len(image_lists) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(image_lists)} image lists")
        gen = gen_config or self.default_gen_config
        requests = [(p, [ImageInput.of(x) for x in imgs]) for p, imgs in zip(prompt_list, image_lists)]
        results = self._collect(self._submit(requests, gen), gen)
        return results[0] if single else results

    def prepare(self, prompt: str, images: Sequence[Any] = (), image_max_patch_num: int = -1,
                **image_options: Any) -> tuple[list[int], list[torch.Tensor]]:
        """Tokenize a raw prompt with `<image>` placeholders and preprocess its images: the ids
        and each image's encoder input, as the reference processor gives it (an embeddings
        input adds ids but no input). `image_max_patch_num` (and other image options, e.g.
        max_pixels) as in GenerationConfig."""
        p = self._prepare(prompt, [ImageInput.of(x) for x in images],
                          {"image_max_patch_num": image_max_patch_num, **image_options})
        return p.ids, [v.input.pixels for v in p.visuals if v.input is not None]

    # ----------------------------------------------------------------------------------
    # Inputs → conversations → prompts

    def _render(self, messages: list[Message]) -> tuple[str, list[ImageInput]]:
        prompt = self.family.render_chat([{"role": m.role, "content": self._content(m)} for m in messages])
        return prompt, [img for m in messages for img in m.images]

    def _content(self, m: Message) -> list[dict]:
        if m.images and not any(part.get("type") in ("image", "video") for part in m.parts):
            # a (text, images) turn: the family places its images (and videos) in the text
            text = "".join(part.get("text", "") for part in m.parts)
            n_videos = sum(x.kind == "video" for x in m.images)
            return [{"type": "text", "text": self.family.question_with_media(text, len(m.images) - n_videos, n_videos)}]
        return m.parts

    def _prepare(self, prompt: str, inputs: list[ImageInput], request_options: dict[str, Any]) -> _Prepared:
        self.family.image_options(request_options, {})  # checked even without images, as the server does
        images = [self._visual(x, i, request_options)
                  for i, x in enumerate([x for x in inputs if x.kind == "image"])]
        videos = [self._video(x, j, request_options) for j, x in enumerate([x for x in inputs if x.kind == "video"])]
        exp = self.family.expand_media(prompt, [ImagePlan(v.n_tokens, v.grid) for v in images],
                                       [v.plan for v in videos])
        visuals, keys = exp.arrange(images, videos, lambda v: v.key)
        return _Prepared(exp.ids, exp.spans, visuals, keys)

    def _video(self, vid: ImageInput, index: int, request_options: dict[str, Any]) -> _Visual:
        source = self._fetch(vid.source, index, "video")
        frame_list = video_frames.is_frame_list(source)
        options = self.family.video_options(request_options, vid.options, self.video_limits, frame_list=frame_list)
        if frame_list:
            meta = video_frames.frame_list_meta(source, vid.options.get("fps"), index)
        else:
            source = video_frames.video_bytes(source, index)
            meta = video_frames.probe(source, index)
        plan = self.family.plan_video(meta, options, index)
        x = self.family.preprocess_video(source, options, index, normalize=True)
        return _Visual(plan.n_tokens, input=x, key=f"pixels:{embeds_io.digest(x.pixels)}:{plan.grid}:{options}",
                       grid=plan.grid, plan=plan)

    def _visual(self, img: ImageInput, index: int, request_options: dict[str, Any]) -> _Visual:
        if (given := _embeds_source(img.source)) is not None:
            tensor, grid = given
            rows = embeds_io.check(embeds_io.as_torch(tensor, index), index, self.family.embeds_row_multiple,
                                   self.cfg.llm.hidden_size, self.dtype)
            try:
                grid = self.family.embeds_grid(rows.shape[0], grid if grid is not None else img.options.get("grid_thw"))
            except OptionError as e:
                raise embeds_io.EmbedsError(f"embeds {index}: {e}") from None
            # as the server's key: the grid changes the positions, hence the KV
            key = f"embeds:{embeds_io.digest(rows)}" + (f":{list(grid)}" if grid else "")
            return _Visual(rows.shape[0], embeds=rows, key=key, grid=grid)
        options = self.family.image_options(request_options, img.options)
        # Normalised on the host, as the reference processor does (the server's workers ship
        # the compact form instead; the encoder gives the same rows for both).
        x = self.family.preprocess(self._fetch(img.source, index), options, index, normalize=True)
        # Keyed on the preprocessed pixels (any source, PIL images included) and the options.
        return _Visual(x.n_tokens, input=x, key=f"pixels:{embeds_io.digest(x.pixels)}:{x.grid}:{options}",
                       grid=x.grid)

    def _fetch(self, source: Any, index: int, kind: str = "image") -> Any:
        """The bytes of an http(s) or data: URL; any other source as it is."""
        if not isinstance(source, str) or not source.startswith(("http://", "https://", "data:")):
            return source
        try:
            if source.startswith("data:"):
                return base64.b64decode(source.partition(",")[2], validate=True)
            with urllib.request.urlopen(source, timeout=self.fetch_timeout) as r:
                return r.read()
        except Exception as e:  # urllib and base64 raise many types; the message names the image
            raise ImageError(index, f"cannot read {source[:100]!r} ({type(e).__name__}: {e})", kind) from None

    # ----------------------------------------------------------------------------------
    # Generation

    def _submit(self, requests: list[tuple[str, list[ImageInput]]], gen: GenerationConfig) -> Iterator[StreamResponse]:
        """Validate and prepare every request now (so a bad one fails before any runs), then
        return the generator that runs them."""
        params = gen.sampling_params(self.stop_token_ids)
        params.validate()
        options = gen.image_options()  # the request's image options, for the family
        prepared = [self._prepare(prompt, imgs, options) for prompt, imgs in requests]
        if self.session_len is not None:
            for p in prepared:
                if len(p.ids) + params.max_new_tokens > self.session_len:
                    raise ValueError(f"prompt ({len(p.ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                                     f"{len(p.ids) + params.max_new_tokens} exceeds session_len {self.session_len}")
        return self._generate(prepared, params, gen)

    def _generate(self, prepared: list[_Prepared], params: SamplingParams,
                  gen: GenerationConfig) -> Iterator[StreamResponse]:
        live: dict[int, _Live] = {}
        try:
            embeds = self._encode_all([v for p in prepared for v in p.visuals])
            for index, p in enumerate(prepared):
                rows = [embeds.pop(0) for _ in p.visuals]
                rid = self.engine.add_request(p.ids, _copy_params(params),
                                              **self.image_inputs(p.ids, rows, p.spans, p.keys),
                                              **self.family.rope_inputs(p.ids, p.spans, [v.grid for v in p.visuals]))
                detok = IncrementalDetokenizer(self.tokenizer, gen.skip_special_tokens, list(gen.stop_sequences),
                                               prompt_ids=p.ids)
                live[rid] = _Live(index, len(p.ids), detok)
            while live:
                for out in self.engine.step():
                    yield self._advance(live, out, gen.logprobs)
        finally:  # an exception, or a consumer that stops early, must not leak KV slots
            for rid in live:
                self.engine.abort(rid)

    @torch.inference_mode()
    def _encode_all(self, visuals: list[_Visual]) -> list[torch.Tensor]:
        """Each image's embedding rows [n_tokens, hidden]: given ones as they are, the others
        encoded together (one encoder batch stream for the whole call)."""
        inputs = [v.input for v in visuals if v.embeds is None]
        step = self.vision_batch or max(len(inputs), 1)
        feats = iter([f for i in range(0, len(inputs), step)
                      for f in self.model.vision.encode_images(inputs[i:i + step])])
        return [v.embeds.to(self.device) if v.embeds is not None else next(feats) for v in visuals]

    def image_inputs(self, ids: list[int], rows: list[torch.Tensor], spans: Sequence[Span] | None = None,
                     keys: Sequence[str] | None = None) -> dict[str, Any]:
        """`Engine.add_request` keywords for a prompt and its images' embedding rows, in order;
        `spans` from the prompt's expansion (without them the prompt is expanded again);
        `keys` the images' content identities for the prefix cache (without them, an image
        shares no KV)."""
        if not rows:
            return {}
        out = {"image_embeds": torch.cat(rows),
               "image_spans": list(spans if spans is not None else self.family.find_spans(ids))}
        return out if keys is None else {**out, "image_keys": list(keys)}

    def encode(self, pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Embedding rows of each image's input (as `prepare` returns them)."""
        return self._encode_all([_Visual(0, input=VisionInput(p)) for p in pixels])

    def _advance(self, live: dict[int, _Live], out: StepOutput, want_logprobs: bool) -> StreamResponse:
        st = live[out.req_id]
        st.count += 1
        if out.prompt_cache_len is not None:
            st.prompt_cache_len = out.prompt_cache_len
        text = st.detok.push(out.token_id)
        reason = None
        if st.detok.stopped and not out.finished:  # a stop string: the engine cannot see those
            self.engine.abort(out.req_id, "stop")
            reason = "stop"
        elif out.finished:
            reason = out.finish_reason
        if reason is not None:
            if not st.detok.stopped:
                text += st.detok.flush()
            del live[out.req_id]
        return StreamResponse(text, [out.token_id], reason, st.index, st.prompt_tokens, st.count,
                              [out.logprob] if want_logprobs else None, [out.top] if out.top is not None else None,
                              st.prompt_cache_len)

    def _collect(self, stream: Iterator[StreamResponse], gen: GenerationConfig,
                 progress_total: int | None = None) -> list[Response]:
        """Assemble each input's Response; a progress bar counts finished inputs if a total is given."""
        results: dict[int, Response] = {}
        show = progress_total is not None and self.progress
        with contextlib.closing(stream), tqdm(total=progress_total, desc="generating", unit="req", leave=False,
                                              disable=not show) as bar:
            for out in stream:
                r = results.setdefault(out.index, Response("", [], None, out.prompt_tokens,
                                                           [] if gen.logprobs else None, out.index,
                                                           [] if gen.top_logprobs else None))
                r.prompt_cache_len = out.prompt_cache_len
                r.text += out.text
                r.token_ids += out.token_ids
                if r.logprobs is not None:
                    r.logprobs += out.logprobs
                if r.top_logprobs is not None:
                    r.top_logprobs += out.top_logprobs
                if out.finish_reason is not None:
                    r.finish_reason = out.finish_reason
                    bar.update(1)
        return [results[i] for i in sorted(results)]


@dataclass
class _Live:
    index: int
    prompt_tokens: int
    detok: IncrementalDetokenizer
    count: int = 0
    prompt_cache_len: int = 0


def _embeds_source(source: Any) -> tuple[Any, Any] | None:
    """(tensor, grid or None) if an image source is precomputed embeddings: a tensor, a
    `(tensor, grid_thw)` pair, or a dict {"embeds": tensor, "grid_thw": [t, h, w]}."""
    if embeds_io.is_tensor(source):
        return source, None
    if _is_embeds_pair(source):
        return source[0], source[1]
    if isinstance(source, dict) and embeds_io.is_tensor(source.get("embeds")):
        return source["embeds"], source.get("grid_thw")
    return None


def _is_embeds_pair(x: Any) -> bool:
    """(embeddings, grid_thw): a 2-tuple of a tensor and a list, tuple or 1-D tensor (two
    embeddings tensors are two images)."""
    if not (isinstance(x, tuple) and len(x) == 2 and embeds_io.is_tensor(x[0])):
        return False
    g = x[1]
    return isinstance(g, (list, tuple)) or (isinstance(g, torch.Tensor) and g.ndim == 1)


def _is_batch(inputs: Any) -> bool:
    """A list of inputs, as opposed to one conversation given as a list of message dicts."""
    return isinstance(inputs, list) and not (inputs and all(isinstance(m, dict) for m in inputs))


def _conversation(item: Any) -> list[Message]:
    """One input (text, a (text, images) tuple, or OpenAI-format messages) as chat turns."""
    if isinstance(item, str):
        return [_user_turn(item, [])]
    if isinstance(item, tuple):
        imgs = item[1] if len(item) > 1 else []
        one = not isinstance(imgs, (list, tuple)) or _is_embeds_pair(imgs)  # (tensor, grid_thw) is one image
        return [_user_turn(item[0], [imgs] if one else list(imgs))]
    if isinstance(item, list) and all(isinstance(m, dict) for m in item):
        return [_openai_message(m, i) for i, m in enumerate(item)]
    raise TypeError(f"unsupported input {type(item).__name__}; use text, (text, image), (text, [images]) "
                    "or a list of OpenAI-format messages")


def _user_turn(text: str, images: list[Any]) -> Message:
    # The family places the images in the text (InternVL's chat(): before the question unless
    # the text places them with <image>): see `Pipeline._render`.
    return Message("user", [{"type": "text", "text": text}], [ImageInput.of(x) for x in images])


def _openai_message(m: dict, index: int) -> Message:
    """An OpenAI-format message; image parts become `<image>` where they stand."""
    role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name
    content = m.get("content")
    if content is None or isinstance(content, str):
        return Message(role, [{"type": "text", "text": content or ""}])
    parts, images = [], []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text", "")})
            continue
        images.append(_image_part(part, kind, index))
        parts.append({"type": images[-1].kind})
    return Message(role, parts, images)


def _image_part(part: dict, kind: str, index: int) -> ImageInput:
    if kind == "image_url":
        value = part.get("image_url")
        if isinstance(value, dict):  # other keys are the image's options, for the family
            return ImageInput(value.get("url"), {k: v for k, v in value.items() if k != "url"})
        return ImageInput(value)
    if kind == "image_data":  # LMDeploy's {"type": "image_data", "image_data": {"data": PIL image}}
        value = part.get("image_data") or {}
        return ImageInput(value.get("data"), {k: v for k, v in value.items() if k != "data"})
    if kind == "image_embeds":  # a tensor, or the server's base64 safetensors string (+ grid_thw for Qwen2-VL)
        value = part.get(kind)
        if isinstance(value, str):
            value = embeds_io.from_safetensors(embeds_io.b64decode(value, index), index)
        return ImageInput(value, {k: v for k, v in part.items() if k not in ("type", kind)})
    if kind == "image":
        return ImageInput(part.get(kind))
    if kind == "video_url":  # OpenAI-style, as the server's: {"url": …, "num_frames": n, …}
        value = part.get("video_url")
        if isinstance(value, dict):
            return ImageInput(value.get("url"), {k: v for k, v in value.items() if k != "url"}, "video")
        return ImageInput(value, {}, "video")
    if kind == "video":  # {"type": "video", "video": bytes | path | URL | [PIL frames] | Video}
        value = part.get(kind)
        return ImageInput.of(value) if isinstance(value, Video) else ImageInput(value, {}, "video")
    raise PromptError(f"message {index}: content part type {kind!r} is not supported "
                      "(use 'text', 'image_url', 'image_data', 'image', 'image_embeds', 'video_url' or 'video')")


def _copy_params(params: SamplingParams) -> SamplingParams:
    return SamplingParams(**{f.name: getattr(params, f.name) for f in fields(SamplingParams)})


def _engine_config(opts: EngineOptions, base: EngineConfig | None, llm, device: str) -> EngineConfig:
    """LMDeploy's backend options as the engine's knobs (over `base`, the keyword ones)."""
    cfg = base or EngineConfig()
    if opts.session_len is not None:
        cfg.max_req_len = opts.session_len
        cfg.max_total_tokens = max(cfg.max_total_tokens, opts.session_len)
    if opts.max_batch_size is not None:
        cfg.max_requests = opts.max_batch_size
    if opts.max_prefill_token_num is not None:
        cfg.batch_max_tokens = opts.max_prefill_token_num
    cfg.disable_dynamic_prompt_cache = not opts.enable_prefix_caching
    share = opts.cache_max_entry_count
    if share > 1:
        cfg.max_total_tokens = int(share)
    elif device.startswith("cuda"):  # LMDeploy: this share of the free memory after the weights
        free, _ = torch.cuda.mem_get_info()
        c = llm.cfg
        per_token = 2 * c.num_layers * llm.num_kv_heads * c.head_dim * llm.dtype.itemsize
        cfg.max_total_tokens = max(int(free * share) // per_token, cfg.max_req_len)
    if cfg.max_req_len > cfg.max_total_tokens:
        raise ValueError(f"session_len {cfg.max_req_len} needs more KV slots than the cache holds "
                         f"({cfg.max_total_tokens}); raise cache_max_entry_count")
    return cfg


def pipeline(model_dir: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype = "auto",
             backend_config: EngineOptions | None = None, chat_template_config: ChatTemplateConfig | None = None,
             vision_config: VisionConfig | None = None, log_level: str | None = None,
             **engine_kwargs: Any) -> Pipeline:
    """Load a checkpoint for in-process generation. `backend_config` / `chat_template_config` /
    `vision_config` are LMDeploy's (see `mmserver.messages`); extra keyword arguments set
    EngineConfig fields (an unknown one is an error naming it)."""
    names = {f.name for f in fields(EngineConfig)}
    unknown = sorted(set(engine_kwargs) - names)
    if unknown:
        raise TypeError(f"pipeline(): unknown option(s) {', '.join(unknown)}; known: backend_config, "
                        f"chat_template_config, vision_config, log_level, {', '.join(sorted(names))}")
    for value, cls, name in ((backend_config, EngineOptions, "backend_config"),
                             (chat_template_config, ChatTemplateConfig, "chat_template_config"),
                             (vision_config, VisionConfig, "vision_config")):
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"pipeline(): {name} must be a {cls.__name__}, got {type(value).__name__}")
    if log_level is not None:
        import logging

        logging.getLogger("mmserver").setLevel(log_level.upper())
    return Pipeline(model_dir, device=device, dtype=dtype,
                    engine_config=EngineConfig(**engine_kwargs) if engine_kwargs else None,
                    backend_config=backend_config, chat_template_config=chat_template_config,
                    vision_config=vision_config)
