"""The model-family interface: all the server and the pipeline may know about a model.

A family (InternVL, later Qwen2-VL, LLaVA, …) is one folder under `mmserver/models/` with a
`ModelFamily` subclass, listed in `registry.py`. It owns everything specific to it: config
parsing, weight names and the vision encoder's shard rules, what an image becomes (tokens,
preprocessing, encoder), prompt expansion, the chat template, stop ids and RoPE positions.
The intake, the visual workers, the router, the pipeline and the HTTP layer call only these
methods, so a new family touches no file outside its folder but the registry (and kernels
where its math is new). The LLM decoder and `LLMConfig` are shared (`models/llm/`).

Which process calls what:

    HTTP intake   image_options → plan_image (header only), video_options → plan_video
                  (header only) → expand_media; render_chat, stop_token_ids, tokenizer,
                  embeds_row_multiple
    visual        load_weights("vision") → build_encoder; preprocess_media (preprocess or
                  preprocess_video, by the option key) → encoder.encode_images; warmup_input
    router        load_weights("llm") → build_llm; rope_inputs (keywords of Engine.add_request)
    pipeline      all of the above, in one process
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol, Sequence, Union

import torch

from .errors import OptionError, PromptError, VideoError
from .llm.config import LLMConfig

if TYPE_CHECKING:
    from PIL import Image

    from .llm.decoder import DecoderLM
    from .parallel import TPGroup
    from .video_io import VideoMeta

Span = tuple[int, int]  # (start, length) of one image's embedding rows in the prompt
ImageSource = Union["Image.Image", str, "os.PathLike[str]", bytes, bytearray, memoryview]
# A video: its file bytes (or a path), or frames already sampled (the offline pipeline)
VideoSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", Sequence["Image.Image"]]
COMPONENTS = ("vision", "llm")
VIDEO_PREFIX = "video:"  # a video's option key starts with it: preprocess_media dispatches on it


@dataclass(frozen=True)
class ImagePlan:
    """What an image (or a video) becomes, known from its header (size; a video's frame count
    and rate) and options alone."""

    n_tokens: int  # embedding rows, and prompt positions they fill
    grid: tuple[int, ...] = ()  # family metadata `rope_inputs` may need (Qwen2-VL: (t, h, w)); () for none
    # The prompt spans its rows fill, in order, when more than one (an InternVL video: one per
    # frame, text between them); () means one span of n_tokens.
    segments: tuple[int, ...] = ()
    frames: int = 0  # a video's sampled frames (0 for an image)

    @property
    def span_lengths(self) -> tuple[int, ...]:
        return self.segments or (self.n_tokens,)


@dataclass(frozen=True)
class VideoLimits:
    """The server's caps on one video (--max_video_frames, --max_video_pixels)."""

    max_frames: int = 768  # sampled frames; qwen-vl-utils' FPS_MAX_FRAMES
    # resized pixels of one video, as its family counts them (InternVL: every frame's tile;
    # Qwen2-VL: one frame per temporal patch); qwen-vl-utils' VIDEO_TOTAL_PIXELS
    max_pixels: int = 90_316_800


@dataclass
class Expansion:
    """A prompt with its images' and videos' placeholders expanded."""

    ids: list[int]
    spans: list[Span]  # every span, in prompt order
    items: list[tuple[str, int]]  # per span: ("image", i) or ("video", j), the input it belongs to

    def arrange(self, images: Sequence[Any], videos: Sequence[Any], key: Callable[[Any], str]) -> tuple[list, list[str]]:
        """The inputs in the order of their embedding rows (each once, by its first span), and
        each span's prefix-cache key: its input's `key`, with `#k` on the k-th span of an input
        that fills several (an InternVL video's frames)."""
        lists = {"image": images, "video": videos}
        order = list(dict.fromkeys(self.items))
        spans_of = {item: self.items.count(item) for item in order}
        keys, seen = [], dict.fromkeys(order, 0)
        for item in self.items:
            k = key(lists[item[0]][item[1]])
            keys.append(k if spans_of[item] == 1 else f"{k}#{seen[item]}")
            seen[item] += 1
        return [lists[kind][i] for kind, i in order], keys


def is_video_options(options: str) -> bool:
    return options.startswith(VIDEO_PREFIX)


@dataclass
class VisionInput:
    """One image as its family's encoder takes it: any shape and dtype (InternVL: uint8 tiles
    [n, 448, 448, 3]; Qwen2-VL: patches [N, C·T·P·P] plus a grid), so inputs of different
    sizes batch as a list, never by stacking."""

    pixels: torch.Tensor
    n_tokens: int = 0  # rows the encoder will return for it; 0 when not stated
    grid: tuple[int, ...] = ()


class FamilyConfig(Protocol):
    """The parts of a family's parsed config that shared code reads."""

    llm: LLMConfig
    torch_dtype: str  # the checkpoint's dtype name ("bfloat16", …)


class ImageEncoder(Protocol):
    device: torch.device
    dtype: torch.dtype

    def encode_images(self, inputs: Sequence[VisionInput]) -> list[torch.Tensor]:
        """One `[n_tokens_i, llm hidden]` tensor per input, in order. Under tensor parallelism
        every rank is called with the same inputs."""
        ...


@dataclass
class LoadedModel:
    """A family's encoder and the shared decoder, loaded for one process (either may be None
    when only one component was loaded)."""

    family: "ModelFamily"
    vision: ImageEncoder | None
    llm: "DecoderLM | None"

    @property
    def cfg(self) -> FamilyConfig:
        return self.family.config

    @property
    def device(self) -> torch.device:
        return (self.llm or self.vision).device

    @property
    def dtype(self) -> torch.dtype:
        return (self.llm or self.vision).dtype


class ModelFamily(ABC):
    """One checkpoint directory, read by its family. Construct through `registry.load_family`."""

    name: ClassVar[str]
    # What marks an image's place in a prompt (the pipeline's IMAGE_TOKEN).
    image_placeholder: ClassVar[str] = "<image>"
    # What marks a video's place, for families that take videos.
    video_placeholder: ClassVar[str] = "<video>"
    supports_video: ClassVar[bool] = False
    # The environment variables the family reads when it is built, for --help.
    env_help: ClassVar[str] = ""

    def __init__(self, model_dir: str | os.PathLike, trust_remote_code: bool = False):
        from .chat_templates import from_env

        self.model_dir = Path(model_dir)
        self.trust_remote_code = trust_remote_code
        self._tokenizer = None
        # A template chosen by name or file (--chat_template, ChatTemplateConfig) over the
        # family's own: every subclass's render_chat goes through it (see __init_subclass__).
        self.chat_override = from_env()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("render_chat")
        if own is None or getattr(own, "__isabstractmethod__", False) or getattr(own, "_takes_override", False):
            return

        @functools.wraps(own)
        def render_chat(self, messages, add_generation_prompt=True):
            if self.chat_override is None:
                return own(self, messages, add_generation_prompt)
            return self.chat_override.render(messages, add_generation_prompt, self.image_placeholder,
                                             lambda m, g: own(self, m, g))

        render_chat._takes_override = True
        cls.render_chat = render_chat

    # ----------------------------------------------------------------- config and loading

    @property
    @abstractmethod
    def config(self) -> FamilyConfig:
        """The parsed config (read and checked in the constructor, before any weight)."""

    @abstractmethod
    def load_weights(self, device: str = "cpu", dtype: torch.dtype = torch.float32, tp: "TPGroup | None" = None,
                     components: Sequence[str] = COMPONENTS, progress: bool = True,
                     workers: int = 1) -> dict[str, torch.Tensor]:
        """This rank's weights of `components` ("vision", "llm") under canonical names, sharded
        for `tp` (the LLM by `parallel.shard_llm_weights`, the encoder by the family's rules);
        `workers` threads read the files."""

    @abstractmethod
    def build_encoder(self, weights: dict[str, torch.Tensor], tp: "TPGroup | None" = None) -> ImageEncoder:
        ...

    def build_llm(self, weights: dict[str, torch.Tensor], tp: "TPGroup | None" = None) -> "DecoderLM":
        from .llm.decoder import DecoderLM

        return DecoderLM(self.config.llm, weights, tp)

    def load_model(self, device: str = "cpu", dtype: torch.dtype = torch.float32, tp: "TPGroup | None" = None,
                   components: Sequence[str] = COMPONENTS, progress: bool = True, workers: int = 1) -> LoadedModel:
        weights = self.load_weights(device, dtype, tp, components, progress, workers)
        vision = self.build_encoder(weights, tp) if "vision" in components else None
        llm = self.build_llm(weights, tp) if "llm" in components else None
        return LoadedModel(self, vision, llm)

    # ----------------------------------------------------------------- tokens and prompts

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, loaded (and checked by `check_tokenizer`) on first use."""
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.model_dir, trust_remote_code=self.trust_remote_code)
            self.check_tokenizer(tokenizer)
            self._tokenizer = tokenizer
        return self._tokenizer

    def check_tokenizer(self, tokenizer) -> None:
        """Raise (ConfigError / PromptError) if the tokenizer lacks what prompts need."""

    @abstractmethod
    def expand_prompt(self, prompt: str, token_counts: Sequence[int]) -> tuple[list[int], list[Span]]:
        """Tokenize `prompt`, whose i-th image placeholder becomes `token_counts[i]` image
        positions; returns the ids and each image's span. Raises PromptError."""

    def expand_media(self, prompt: str, images: Sequence[ImagePlan], videos: Sequence[ImagePlan] = ()) -> Expansion:
        """`expand_prompt` with videos too: the ids, every span in prompt order and the input
        each belongs to. A family that takes videos overrides it. Raises PromptError."""
        if videos:
            raise PromptError(f"{self.name} models do not take videos")
        ids, spans = self.expand_prompt(prompt, [p.n_tokens for p in images])
        return Expansion(ids, spans, [("image", i) for i in range(len(spans))])

    def find_spans(self, ids: Sequence[int]) -> list[Span]:
        """Each image's span in ids that `expand_prompt` made, for callers that kept only the
        ids (the server and the pipeline use the spans of the expansion itself)."""
        raise NotImplementedError(f"{type(self).__name__} cannot find image spans in bare ids")

    @abstractmethod
    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """OpenAI-style messages (content: text, or parts where {"type": "image"} marks an
        image) as a prompt in the model's own template. Raises PromptError."""

    def question_with_images(self, text: str, num_images: int) -> str:
        """A user turn's text with `num_images` images (the offline `(text, images)` input):
        the placeholders go before the question unless the text places them."""
        if num_images == 0 or self.image_placeholder in text:
            return text
        return f"{self.image_placeholder}\n" * num_images + text

    def question_with_media(self, text: str, num_images: int, num_videos: int) -> str:
        """`question_with_images`, with `num_videos` video placeholders before it (unless the
        text places them): a (text, [videos and images]) turn."""
        text = self.question_with_images(text, num_images)
        if num_videos == 0 or self.video_placeholder in text:
            return text
        return self.video_placeholder * num_videos + text

    @abstractmethod
    def stop_token_ids(self) -> list[int]:
        """Ids that end a chat generation."""

    # ----------------------------------------------------------------- images

    @property
    def embeds_row_multiple(self) -> int:
        """Precomputed embeddings stand for an image if their row count is a positive multiple
        of this (the rows of the smallest unit the encoder emits)."""
        return 1

    def embeds_grid(self, n_rows: int, grid: Any) -> tuple[int, ...]:
        """The grid `rope_inputs` needs for precomputed embeddings of `n_rows` rows, from the
        `grid_thw` given with them (None if none was). () for families whose positions need no
        grid (a given one is ignored). Raises OptionError("grid_thw", …)."""
        return ()

    @abstractmethod
    def image_options(self, request: Mapping[str, Any], image: Mapping[str, Any]) -> str:
        """Validate one image's options (`image`: given with it, e.g. an OpenAI image part's
        extra keys; `request`: the request's image parameters) and return what they resolve
        to as a stable string: part of the embedding-cache key, and what `plan_image` and
        `preprocess` read. Unknown keys are ignored. Raises OptionError naming the option."""

    @abstractmethod
    def plan_image(self, width: int, height: int, options: str) -> ImagePlan:
        """What a width×height image becomes, without its pixels."""

    @abstractmethod
    def preprocess(self, image: ImageSource, options: str, index: int = 0, normalize: bool = False) -> VisionInput:
        """Decode and prepare one image. `normalize=False` gives the compact form that travels
        between processes (the encoder finishes it on its device); True gives the reference
        processor's values, which the encoder takes as well. Raises ImageError (`index` names
        the image)."""

    def preprocess_media(self, source: Any, options: str, index: int = 0, normalize: bool = False) -> VisionInput:
        """`preprocess` or `preprocess_video`, by the option key (what the visual workers call)."""
        if is_video_options(options):
            return self.preprocess_video(source, options, index, normalize)
        return self.preprocess(source, options, index, normalize)

    # ----------------------------------------------------------------- videos

    def video_options(self, request: Mapping[str, Any], video: Mapping[str, Any], limits: VideoLimits) -> str:
        """Validate one video's options (`num_frames`, `fps`, …: the video's own, else the
        request's) against the server's `limits` and return them resolved as a stable string
        starting with VIDEO_PREFIX (part of the cache key; what `plan_video` and
        `preprocess_video` read). Raises OptionError naming the option."""
        raise OptionError("videos", f"are not supported by {self.name} models")

    def plan_video(self, meta: "VideoMeta", options: str, index: int = 0) -> ImagePlan:
        """What a video with this header becomes: frames sampled, tokens, spans, grid.
        Raises VideoError (cannot be sampled) or MediaTooLarge (over the caps in `options`)."""
        raise VideoError(index, f"videos are not supported by {self.name} models")

    def preprocess_video(self, video: VideoSource, options: str, index: int = 0,
                         normalize: bool = False) -> VisionInput:
        """Decode only the sampled frames and prepare them as one encoder input, as `preprocess`
        (`normalize`: the reference processor's values). Raises VideoError / MediaTooLarge."""
        raise VideoError(index, f"videos are not supported by {self.name} models")

    @abstractmethod
    def warmup_input(self) -> VisionInput:
        """A small input that runs every kernel of the encoder once (compiled before serving)."""

    # ----------------------------------------------------------------- positions

    def rope_inputs(self, ids: Sequence[int], spans: Sequence[Span],
                    grids: Sequence[tuple[int, ...]]) -> dict[str, Any]:
        """Extra `Engine.add_request` keywords for a prompt's RoPE positions: {} for plain
        0..L-1 (InternVL); an M-RoPE family returns {"rope_positions": Tensor[3, L],
        "rope_delta": int} from its images' spans and grids."""
        return {}
