"""InternVL (2, 2.5, 3) as a `ModelFamily`: dynamic tiling, 256 tokens per 448² tile,
`<img><IMG_CONTEXT>…</img>` prompts, MPT-style templates, plain 0..L-1 positions.

Image options: the request's `image_max_patch_num` (-1: the default) and an image's own
`max_dynamic_patch` (OpenAI image part, LMDeploy's name) cap its tiles; the default cap is
MAX_PATCH_NUM, else the checkpoint's `max_dynamic_patch`. The cap is the option key
(`max{cap}`, so the cache key reads `md5:max12`).

Videos follow InternVL's own chat examples (`load_video`): `num_frames` segments (default 8),
the middle frame of each, one 448² tile per frame (no thumbnail); `<video>` becomes
`Frame1: <image>\nFrame2: <image>\n…`, so a video is exactly its frames sent as images with a
1-tile cap under those prefixes. `fps` instead samples frames-per-second·duration segments.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from ..errors import OptionError, PromptError
from ..family import COMPONENTS, Expansion, ImagePlan, ImageSource, ModelFamily, VideoLimits, VideoSource, VisionInput
from ..options import env_positive_int, is_int
from ..parallel import TPGroup
from .. import video_frames, video_options
from .config import InternVLConfig, load_config, stop_token_ids
from .preprocess import load_image, normalize_pixels, num_tiles, tile_pixels
from .prompt import (SpecialIds, context_spans, expand_prompt, frames_prompt, get_template, question_with_images,
                     split_media)

DEFAULT_VIDEO_FRAMES = 8  # InternVL's chat examples: load_video(num_segments=8, max_num=1)


class InternVLFamily(ModelFamily):
    name = "internvl"
    supports_video = True
    env_help = ("INTERNVL_IMAGE_LENGTH (image tokens per tile; must match the checkpoint), "
                "MAX_PATCH_NUM (default tile cap per image)")

    def __init__(self, model_dir: str | os.PathLike, trust_remote_code: bool = False):
        super().__init__(model_dir, trust_remote_code)
        self._cfg = load_config(self.model_dir)  # also checks INTERNVL_IMAGE_LENGTH
        # tile cap of images whose request sets none
        self.default_cap = env_positive_int("MAX_PATCH_NUM") or self._cfg.max_dynamic_patch
        self._special: SpecialIds | None = None

    @property
    def config(self) -> InternVLConfig:
        return self._cfg

    # ----------------------------------------------------------------- loading

    def load_weights(self, device: str = "cpu", dtype: torch.dtype = torch.float32, tp: TPGroup | None = None,
                     components: Sequence[str] = COMPONENTS, progress: bool = True,
                     workers: int = 1) -> dict[str, torch.Tensor]:
        from .model import load_sharded_weights

        return load_sharded_weights(self.model_dir, self._cfg, device, dtype, tp, tuple(components), progress,
                                    workers)

    def build_encoder(self, weights: dict[str, torch.Tensor], tp: TPGroup | None = None):
        from .vision import VisionEncoder

        return VisionEncoder(self._cfg, weights, tp)

    # ----------------------------------------------------------------- prompts

    def check_tokenizer(self, tokenizer) -> None:
        self._special = SpecialIds.from_tokenizer(tokenizer)

    @property
    def special(self) -> SpecialIds:
        """`<img>`, `</img>` and `<IMG_CONTEXT>` ids of the tokenizer."""
        if self._special is None:
            self.check_tokenizer(self.tokenizer)
        return self._special

    def expand_prompt(self, prompt: str, token_counts: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        return expand_prompt(self.tokenizer, prompt, token_counts, self.special)

    def expand_media(self, prompt: str, images: Sequence[ImagePlan], videos: Sequence[ImagePlan] = ()) -> Expansion:
        """Each `<video>` becomes its frames as `Frame{i}: <image>\n` (i from 1), each frame an
        image of one tile; images and frames then expand as images do."""
        pieces = split_media(prompt)  # text, then (kind, text) per placeholder
        n_img = sum(1 for kind, _ in pieces if kind == "image")
        n_vid = sum(1 for kind, _ in pieces if kind == "video")
        if n_img != len(images):
            raise PromptError(f"prompt has {n_img} image placeholder(s) (<image>) but {len(images)} image(s) were given")
        if n_vid != len(videos):
            raise PromptError(f"prompt has {n_vid} video placeholder(s) (<video>) but {len(videos)} video(s) were given")
        text, counts, items = [], [], []
        next_index = {"image": 0, "video": 0}
        for kind, piece in pieces:
            if kind == "text":
                text.append(piece)
                continue
            i = next_index[kind]
            next_index[kind] += 1
            if kind == "image":
                text.append(piece)
                counts.append(images[i].n_tokens)
                items.append(("image", i))
            else:
                lengths = videos[i].span_lengths
                text.append(frames_prompt(len(lengths)))
                counts.extend(lengths)
                items.extend([("video", i)] * len(lengths))
        ids, spans = expand_prompt(self.tokenizer, "".join(text), counts, self.special)
        return Expansion(ids, spans, items)

    def find_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        return context_spans(ids, self.special.img_context)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return get_template(self._cfg.template).render(messages, self._cfg.system_message, add_generation_prompt)

    def question_with_images(self, text: str, num_images: int) -> str:
        return question_with_images(text, num_images)

    def stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.model_dir, self.tokenizer, self._cfg.llm.eos_token_ids)

    # ----------------------------------------------------------------- images

    @property
    def embeds_row_multiple(self) -> int:
        return self._cfg.image_tokens_per_tile

    def image_options(self, request: Mapping[str, Any], image: Mapping[str, Any]) -> str:
        req_cap = request.get("image_max_patch_num", -1)
        if not is_int(req_cap) or req_cap == 0 or req_cap < -1:
            raise OptionError("image_max_patch_num", f"must be -1 (model default) or >= 1, got {req_cap}")
        cap = image.get("max_dynamic_patch")
        if cap is not None and (not is_int(cap) or cap < 1):
            raise OptionError("max_dynamic_patch", f"must be an integer >= 1, got {cap!r}")
        return f"max{cap or (req_cap if req_cap > 0 else self.default_cap)}"

    @staticmethod
    def _cap(options: str) -> int:
        return int(options.removeprefix("max"))

    def plan_image(self, width: int, height: int, options: str) -> ImagePlan:
        tiles = num_tiles(width, height, max_num=self._cap(options), min_num=self._cfg.min_dynamic_patch,
                          use_thumbnail=self._cfg.use_thumbnail)
        return ImagePlan(tiles * self._cfg.image_tokens_per_tile)

    def preprocess(self, image: ImageSource, options: str, index: int = 0, normalize: bool = False) -> VisionInput:
        # uint8 tiles: a quarter of the float bytes; the encoder normalises them on its device
        tiles = tile_pixels(load_image(image, index), max_num=self._cap(options),
                            min_num=self._cfg.min_dynamic_patch, use_thumbnail=self._cfg.use_thumbnail)
        pixels = normalize_pixels(tiles) if normalize else tiles
        return VisionInput(pixels, tiles.shape[0] * self._cfg.image_tokens_per_tile)

    # ----------------------------------------------------------------- videos

    def video_options(self, request: Mapping[str, Any], video: Mapping[str, Any], limits: VideoLimits,
                      frame_list: bool = False) -> str:
        return video_options.resolve(request, video, limits, default_frames=DEFAULT_VIDEO_FRAMES,
                                     frame_list=frame_list).key

    def _pick(self, sampling: video_options.VideoSampling):
        """Which frames (by number) a video with this header gives: `load_video`'s segment
        middles for num_frames (or fps·duration) segments; a frame list: every frame."""
        from ..video_io import internvl_indices

        def pick(meta) -> list[int]:
            if sampling.frame_list:
                return list(range(meta.n_frames))
            n = sampling.num_frames
            if n is None:
                n = max(1, min(sampling.max_frames, int(meta.n_frames / meta.fps * sampling.fps)))
            return internvl_indices(meta.n_frames, n)

        return pick

    def plan_video(self, meta, options: str, index: int = 0) -> ImagePlan:
        sampling = video_options.parse(options)
        frames = len(self._pick(sampling)(meta))
        size = self._cfg.vision.image_size
        video_frames.check_budget(frames, size * size, sampling, index)
        per = self._cfg.image_tokens_per_tile
        return ImagePlan(frames * per, segments=(per,) * frames, frames=frames)

    def preprocess_video(self, video: VideoSource, options: str, index: int = 0,
                         normalize: bool = False) -> VisionInput:
        sampling = video_options.parse(options)
        frames = video_frames.sampled_frames(video, sampling, self._pick(sampling), index)
        size = self._cfg.vision.image_size
        video_frames.check_budget(len(frames), size * size, sampling, index)
        # each frame: `load_video`'s dynamic_preprocess(max_num=1): the whole frame as one tile
        tiles = torch.cat([tile_pixels(load_image(f, index), max_num=1, min_num=1,
                                       use_thumbnail=self._cfg.use_thumbnail) for f in frames])
        pixels = normalize_pixels(tiles) if normalize else tiles
        return VisionInput(pixels, tiles.shape[0] * self._cfg.image_tokens_per_tile)

    def warmup_input(self) -> VisionInput:
        size = self._cfg.vision.image_size
        return VisionInput(torch.zeros((1, size, size, 3), dtype=torch.uint8), self._cfg.image_tokens_per_tile)
