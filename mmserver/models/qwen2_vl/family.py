"""Qwen2-VL and Qwen2.5-VL as a `ModelFamily`: native-resolution images (smart_resize to
multiples of 28, gh·gw/4 tokens each) and videos, `<|vision_start|><|image_pad|><|vision_end|>`
(`<|video_pad|>`) prompts, the Qwen chat template, and M-RoPE positions ([3, L] plus a
per-request delta).

Image options: `min_pixels` / `max_pixels` (the request's, or an image's own, which wins) may
only narrow the server's range: the checkpoint's preprocessor_config.json, or the environment's
MIN_PIXELS / MAX_PIXELS (what the server's --min_pixels / --max_pixels set). The resolved range
is the option key (`px{min}-{max}`, so the embedding-cache key reads `md5:px3136-1003520`).

Videos follow qwen-vl-utils 0.0.10 (`fetch_video`; transformers 5.23 for the patches and
positions). Options: `fps` (default 2) or `num_frames` (never both; `video_options.resolve`),
and a per-frame `min_pixels` / `max_pixels` (the video's own, else the request's), within the
server's image range. Frames: `smart_nframes` (fps · duration, at least 4, at most 768 and the
server's --max_video_frames, floored to an even count; num_frames rounded to even), picked by
`linspace(0, n - 1, k).round()`; frames already sampled (a frame list) are all used, the last
repeated to an even count. Size: each frame `smart_resize`d with min = min_pixels (default
VIDEO_MIN_PIXELS = 128·28·28) and max = min(max_pixels, max(min(VIDEO_MAX_PIXELS,
total / frames · 2), int(min · 1.05))), total being the server's --max_video_pixels (qwen-vl-utils'
total_pixels); VIDEO_*_PIXELS are clipped into the server's range. The grid is (frames / 2,
h / 14, w / 14) and the video costs t·gh·gw / 4 tokens. --max_video_pixels is counted as
qwen-vl-utils counts total_pixels: pixels per temporal patch (2 frames count once), so the
frames its own rule yields always fit. Key: `video:fps2.0:mf768:mp90316800:px100352-12845056`.

Choices (where we cannot or do not copy the reference exactly):
* Frames are resized with PIL bicubic, exactly as images (the PIL image processor); qwen-vl-utils
  resizes with torchvision's tensor bicubic with antialias, which this CPU-only stack cannot run
  (no torchvision build for torch+cpu), so pixels differ slightly from a torchvision pipeline.
* A frame list is sized by the same video rule from its first frame (qwen-vl-utils sizes listed
  frames one by one with the image defaults and no total-pixel rule); every frame gets that size.
* `smart_resize` is transformers' (as for images): qwen-vl-utils' first clamps each rounded side
  to >= 28, which differs only for frames with a side under 14 px.
* A requested max_pixels below VIDEO_MIN_PIXELS (and no min_pixels) lowers the default minimum
  to it instead of resizing above the requested maximum.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import video_frames, video_options
from ..errors import ConfigError, MediaTooLarge, OptionError, PromptError, VideoError
from ..family import COMPONENTS, Expansion, ImagePlan, ImageSource, ModelFamily, VideoLimits, VideoSource, VisionInput
from ..image_io import alpha_on_white
from ..options import env_positive_int, is_int
from ..parallel import TPGroup, load_for_rank
from .config import QWEN2_5_VL, QwenVLConfig, load_config
from .preprocess import patchify, patchify_video, plan, resize_rgb, resized_uint8, smart_resize
from .prompt import (SpecialIds, expand_media, expand_prompt, pad_spans, question_with_images, question_with_media,
                     render_chat, rope_index, video_offsets)

# qwen-vl-utils 0.0.10 (vision_process.py)
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
FPS = 2.0
FPS_MAX_FRAMES = 768
FRAME_FACTOR = 2


class QwenVLFamily(ModelFamily):
    name = "qwen2_vl"
    supports_video = True
    env_help = ("MIN_PIXELS / MAX_PIXELS (the server's image pixel range; default: preprocessor_config.json; "
                "requests may only narrow it; a video's per-frame min_pixels / max_pixels lie in it too, default "
                "128·28·28 / 768·28·28 clipped into it; videos take fps (default 2) or num_frames)")

    def __init__(self, model_dir: str | os.PathLike, trust_remote_code: bool = False):
        super().__init__(model_dir, trust_remote_code)
        self._cfg = load_config(self.model_dir)
        self.min_pixels = env_positive_int("MIN_PIXELS") or self._cfg.min_pixels
        self.max_pixels = env_positive_int("MAX_PIXELS") or self._cfg.max_pixels
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        self._special: SpecialIds | None = None

    @property
    def config(self) -> QwenVLConfig:
        return self._cfg

    # ----------------------------------------------------------------- loading

    def load_weights(self, device: str = "cpu", dtype: torch.dtype = torch.float32, tp: TPGroup | None = None,
                     components: Sequence[str] = COMPONENTS, progress: bool = True,
                     workers: int = 1) -> dict[str, torch.Tensor]:
        from .weights import load_weights

        return load_for_rank(lambda dev, prog: load_weights(self.model_dir, self._cfg, dev, dtype, prog,
                                                            tuple(components), workers),
                             self._cfg, device, tp, progress)

    def build_encoder(self, weights: dict[str, torch.Tensor], tp: TPGroup | None = None):
        from .vision import QwenVisionEncoder

        return QwenVisionEncoder(self._cfg, weights, tp)

    # ----------------------------------------------------------------- prompts

    def check_tokenizer(self, tokenizer) -> None:
        c = self._cfg
        names = {"<|vision_start|>": c.vision_start_token_id, "<|vision_end|>": c.vision_end_token_id,
                 "<|image_pad|>": c.image_token_id, "<|video_pad|>": c.video_token_id}
        got = {name: tokenizer.convert_tokens_to_ids(name) for name in names}
        bad = {n: (got[n], i) for n, i in names.items() if got[n] != i}
        if bad:
            raise ConfigError("tokenizer and config.json disagree on the vision tokens: " +
                              ", ".join(f"{n} is {g} in the tokenizer, {i} in the config" for n, (g, i) in bad.items()))
        self._special = SpecialIds(c.vision_start_token_id, c.vision_end_token_id, c.image_token_id,
                                   c.video_token_id)

    @property
    def special(self) -> SpecialIds:
        if self._special is None:
            self.check_tokenizer(self.tokenizer)
        return self._special

    def expand_prompt(self, prompt: str, token_counts: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        return expand_prompt(self.tokenizer, prompt, token_counts, self.special)

    def expand_media(self, prompt: str, images: Sequence[ImagePlan], videos: Sequence[ImagePlan] = ()) -> Expansion:
        """Each `<|image_pad|>` (`<image>`) becomes the next image's tokens, each `<|video_pad|>`
        (`<video>`) the next video's; one tokenization."""
        ids, spans, items = expand_media(self.tokenizer, prompt, [p.n_tokens for p in images],
                                         [p.n_tokens for p in videos], self.special)
        return Expansion(ids, spans, items)

    def find_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """The runs of image and video pad tokens, in order."""
        return pad_spans(ids, self._cfg.image_token_id, self._cfg.video_token_id)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_chat(messages, add_generation_prompt)

    def question_with_images(self, text: str, num_images: int) -> str:
        return question_with_images(text, num_images)

    def question_with_media(self, text: str, num_images: int, num_videos: int) -> str:
        return question_with_media(text, num_images, num_videos)

    def stop_token_ids(self) -> list[int]:
        """generation_config.json's EOS ids (<|im_end|>, <|endoftext|>) and <|im_end|>."""
        ids = list(self._cfg.generation_eos)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if im_end is not None and im_end != self.tokenizer.unk_token_id:
            ids.append(im_end)
        return sorted(set(ids or self._cfg.llm.eos_token_ids))

    # ----------------------------------------------------------------- images

    def _pixel_options(self, request: Mapping[str, Any], media: Mapping[str, Any]) -> dict[str, int]:
        """The given min_pixels / max_pixels (the item's own, else the request's; -1: unset),
        each checked to lie within the server's range."""
        lo, hi = self.min_pixels, self.max_pixels
        values = {}
        for name in ("min_pixels", "max_pixels"):
            value = media.get(name, request.get(name))
            if value is None or value == -1:
                continue
            if not is_int(value) or not lo <= value <= hi:
                raise OptionError(name, f"must be an integer within the server's range [{lo}, {hi}], got {value!r}")
            values[name] = value
        return values

    @staticmethod
    def _check_range(values: Mapping[str, int], mn: int, mx: int) -> None:
        if mn > mx:
            raise OptionError("min_pixels" if "min_pixels" in values else "max_pixels",
                              f"gives an empty range: min_pixels {mn} > max_pixels {mx}")

    def image_options(self, request: Mapping[str, Any], image: Mapping[str, Any]) -> str:
        values = self._pixel_options(request, image)
        mn, mx = values.get("min_pixels", self.min_pixels), values.get("max_pixels", self.max_pixels)
        self._check_range(values, mn, mx)
        return f"px{mn}-{mx}"

    def embeds_grid(self, n_rows: int, grid: Any) -> tuple[int, ...]:
        """Precomputed embeddings carry their grid [t, h, w] (in patches, as transformers'
        image_grid_thw): the positions depend on it; t·h·w/merge² must be their row count."""
        m = self._cfg.vision.spatial_merge_size
        if grid is None:
            raise OptionError("grid_thw", "is required with precomputed embeddings for this model: their M-RoPE "
                                          "positions depend on the image's grid [t, h, w] (in patches)")
        if isinstance(grid, torch.Tensor):
            grid = grid.tolist()
        if not (isinstance(grid, (list, tuple)) and len(grid) == 3 and all(is_int(g) and g >= 1 for g in grid)):
            raise OptionError("grid_thw", f"must be [t, h, w], three positive integers, got {grid!r}")
        t, h, w = grid
        if t != 1:
            raise OptionError("grid_thw", f"{list(grid)}: t must be 1 (an image; precomputed video embeddings are "
                                          "not supported)")
        if h % m or w % m:
            raise OptionError("grid_thw", f"{list(grid)}: h and w must be multiples of {m} (the spatial merge)")
        if t * h * w // (m * m) != n_rows:
            raise OptionError("grid_thw", f"{list(grid)} gives t·h·w/{m * m} = {t * h * w // (m * m)} rows, "
                                          f"but the embeddings have {n_rows}")
        return (t, h, w)

    @staticmethod
    def _range(options: str) -> tuple[int, int]:
        mn, _, mx = options.removeprefix("px").partition("-")
        return int(mn), int(mx)

    def plan_image(self, width: int, height: int, options: str) -> ImagePlan:
        v = self._cfg.vision
        grid = plan(width, height, *self._range(options), v.patch_size, v.spatial_merge_size)
        return ImagePlan(grid[0] * grid[1] * grid[2] // v.spatial_merge_size ** 2, grid)

    def preprocess(self, image: ImageSource, options: str, index: int = 0, normalize: bool = False) -> VisionInput:
        v, c = self._cfg.vision, self._cfg
        pixels, grid = resized_uint8(image, *self._range(options), v.patch_size, v.spatial_merge_size, index)
        if normalize:
            pixels = patchify(pixels, c.image_mean, c.image_std, v.patch_size, v.spatial_merge_size,
                              v.temporal_patch_size)
        return VisionInput(pixels, grid[1] * grid[2] // v.spatial_merge_size ** 2, grid)

    # ----------------------------------------------------------------- videos

    def _clip(self, pixels: int) -> int:
        return min(max(pixels, self.min_pixels), self.max_pixels)

    def video_options(self, request: Mapping[str, Any], video: Mapping[str, Any], limits: VideoLimits,
                      frame_list: bool = False) -> str:
        """fps (default 2) or num_frames, and the per-frame pixel range `px{min}-{max}`: given
        values (within the server's range), else VIDEO_MIN_PIXELS clipped into it and, for the
        maximum, the server's own (the per-frame cap is worked out in `plan_video`)."""
        s = video_options.resolve(request, video, limits, default_fps=FPS, frame_list=frame_list)
        values = self._pixel_options(request, video)
        mx = values.get("max_pixels", self.max_pixels)
        mn = values.get("min_pixels", min(self._clip(VIDEO_MIN_PIXELS), mx))
        self._check_range(values, mn, mx)
        return video_options.with_extra(s, f"px{mn}-{mx}").key

    def _sampling(self, meta, s: video_options.VideoSampling, index: int):
        """qwen-vl-utils' frames of a video file with this header (`video_io.QwenSampling`)."""
        from ..video_io import qwen_sampling

        return qwen_sampling(meta.n_frames, meta.fps, fps=s.fps or FPS, num_frames=s.num_frames,
                             max_frames=min(FPS_MAX_FRAMES, s.max_frames), frame_factor=FRAME_FACTOR, index=index)

    def _pick(self, s: video_options.VideoSampling, index: int, listed: bool, seen: list | None = None):
        def pick(meta) -> list[int]:
            if seen is not None:
                seen.append(meta)
            if listed:
                return list(range(meta.n_frames))
            self._video_plan(meta, s, index, listed)  # refuse (size, budget) before decoding a frame
            return self._sampling(meta, s, index).indices

        return pick

    def _video_plan(self, meta, s: video_options.VideoSampling, index: int,
                    listed: bool) -> tuple[ImagePlan, int, int, int]:
        """The plan of a video with this header, and its sampled frames (before padding) and
        resized height and width."""
        v = self._cfg.vision
        if meta.width <= 0 or meta.height <= 0:
            raise VideoError(index, f"video has zero size ({meta.width}x{meta.height})")
        if listed:
            frames, sample_fps = meta.n_frames, float(meta.fps)
        else:
            q = self._sampling(meta, s, index)
            frames, sample_fps = len(q.indices), float(q.sample_fps)
        if frames < 1:
            raise VideoError(index, "the video has no frames")
        tp = v.temporal_patch_size
        nframes = -(-frames // tp) * tp  # the last frame repeated up to a whole temporal patch
        vmin, vmax = self._range(s.extra)
        # qwen-vl-utils' fetch_video: the total-pixel rule, then the given max_pixels
        cap = min(vmax, max(min(self._clip(VIDEO_MAX_PIXELS), s.max_pixels / nframes * FRAME_FACTOR),
                            int(vmin * 1.05)))
        try:
            h, w = smart_resize(meta.height, meta.width, v.factor, vmin, cap)
        except ValueError as e:
            raise VideoError(index, str(e)) from None
        t, gh, gw = nframes // tp, h // v.patch_size, w // v.patch_size
        video_frames.check_budget(frames, 0, s, index)  # the frame cap
        if t * h * w > s.max_pixels:
            raise MediaTooLarge(index, f"{t} temporal patches ({nframes} frames) × {h * w} pixels = {t * h * w} "
                                       f"exceed the server's {s.max_pixels}-pixel budget per video "
                                       f"(--max_video_pixels; {tp} frames of a temporal patch count once, as "
                                       "qwen-vl-utils' total_pixels)", kind="video")
        grid: tuple[int, ...] = (t, gh, gw)
        if self._cfg.kind == QWEN2_5_VL:  # the temporal positions, as the processor's second_per_grid_ts
            grid += video_offsets(t, float(np.float32(tp / sample_fps)), v.tokens_per_second)
        plan = ImagePlan(t * gh * gw // v.spatial_merge_size ** 2, grid, frames=nframes)
        return plan, frames, h, w

    def plan_video(self, meta, options: str, index: int = 0) -> ImagePlan:
        """Grid (t, gh, gw), or for Qwen2.5-VL (t, gh, gw, *temporal offsets) that `rope_inputs`
        reads; `frames` counts the padded frames the model sees."""
        s = video_options.parse(options)
        return self._video_plan(meta, s, index, s.frame_list)[0]

    def preprocess_video(self, video: VideoSource, options: str, index: int = 0,
                         normalize: bool = False) -> VisionInput:
        """The sampled frames, RGB (alpha on white), each resized (PIL bicubic) to the planned
        size, the last repeated to an even count: uint8 [F, H', W', 3] (normalize: the float
        patches of transformers' video processor). The encoder's grid is (t, gh, gw)."""
        s = video_options.parse(options)
        listed = s.frame_list or video_frames.is_frame_list(video)
        if video_frames.is_frame_list(video):
            video = [alpha_on_white(f) for f in video]
        seen: list = []
        frames = video_frames.sampled_frames(video, s, self._pick(s, index, listed, seen), index)
        meta = seen[0] if seen else video_frames.frame_list_meta(frames, s.fps, index)
        if listed:
            meta = replace(meta, n_frames=len(frames))
        meta = replace(meta, width=frames[0].width, height=frames[0].height)  # the decoded frames' own size
        plan, n, h, w = self._video_plan(meta, s, index, listed)
        if len(frames) != n:
            raise VideoError(index, f"decoded {len(frames)} frames, expected {n}")
        pixels = [resize_rgb(f, h, w) for f in frames]
        pixels += [pixels[-1]] * (plan.frames - n)
        pixels = torch.stack(pixels)
        v, c = self._cfg.vision, self._cfg
        if normalize:
            pixels = patchify_video(pixels, c.image_mean, c.image_std, v.patch_size, v.spatial_merge_size,
                                    v.temporal_patch_size)
        return VisionInput(pixels, plan.n_tokens, plan.grid[:3])

    def warmup_input(self) -> VisionInput:
        # 8×8 merged tokens: two windows (one partial) for Qwen2.5-VL's window attention
        v = self._cfg.vision
        side = 8 * v.spatial_merge_size * v.patch_size if v.window else 2 * v.spatial_merge_size * v.patch_size
        gs = side // v.patch_size
        return VisionInput(torch.zeros((side, side + v.spatial_merge_size * v.patch_size, 3), dtype=torch.uint8),
                           gs * (gs + v.spatial_merge_size) // v.spatial_merge_size ** 2,
                           (1, gs, gs + v.spatial_merge_size))

    # ----------------------------------------------------------------- positions

    def rope_inputs(self, ids: Sequence[int], spans: Sequence[tuple[int, int]],
                    grids: Sequence[tuple[int, ...]]) -> dict[str, Any]:
        """{} for a text-only prompt (plain RoPE is M-RoPE with t = h = w); else the [3, L]
        positions and the delta, as transformers 5.23's get_rope_index. `grids` are the plans'
        (a Qwen2.5-VL video's carries its temporal offsets), one per span in prompt order."""
        if not spans:
            return {}
        if any(len(g) < 3 for g in grids):
            raise PromptError("Qwen2-VL image embeddings need their grid (t, h, w) for the positions")
        if self._cfg.kind == QWEN2_5_VL and any(len(g) == 3 and g[0] > 1 for g in grids):
            raise PromptError("a Qwen2.5-VL video's grid must carry its temporal offsets (plan_video's grid)")
        pos, delta = rope_index(len(ids), spans, grids, self._cfg.vision.spatial_merge_size)
        return {"rope_positions": torch.from_numpy(pos), "rope_delta": delta}
