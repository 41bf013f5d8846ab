"""Qwen2-VL and Qwen2.5-VL as a `ModelFamily`: native-resolution images (smart_resize to
multiples of 28, gh·gw/4 tokens each), `<|vision_start|><|image_pad|><|vision_end|>` prompts,
the Qwen chat template, and M-RoPE positions ([3, L] plus a per-request delta).

Image options: `min_pixels` / `max_pixels` (the request's, or an image's own, which wins) may
only narrow the server's range: the checkpoint's preprocessor_config.json, or the environment's
MIN_PIXELS / MAX_PIXELS (what the server's --min_pixels / --max_pixels set). The resolved range
is the option key (`px{min}-{max}`, so the embedding-cache key reads `md5:px3136-1003520`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigError, OptionError, PromptError
from ..family import COMPONENTS, ImagePlan, ImageSource, ModelFamily, VisionInput
from ..options import env_positive_int, is_int
from ..parallel import TPGroup, shard_weights
from .config import QwenVLConfig, load_config
from .preprocess import patchify, plan, resized_uint8
from .prompt import SpecialIds, expand_prompt, pad_spans, question_with_images, render_chat, rope_index


class QwenVLFamily(ModelFamily):
    name = "qwen2_vl"
    env_help = ("MIN_PIXELS / MAX_PIXELS (the server's image pixel range; default: preprocessor_config.json; "
                "requests may only narrow it)")

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

        components = tuple(components)
        if tp is None or tp.size == 1:
            return load_weights(self.model_dir, self._cfg, device, dtype, progress, components, workers)
        full = load_weights(self.model_dir, self._cfg, "cpu", dtype, progress and tp.rank == 0, components, workers)
        shard = shard_weights(full, self._cfg, tp.rank, tp.size)
        del full
        moved: dict[int, torch.Tensor] = {}  # tied embed / lm_head: one copy on the device
        return {name: moved.setdefault(id(t), t.to(device)) for name, t in shard.items()}

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

    def find_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        return pad_spans(ids, self._cfg.image_token_id)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_chat(messages, add_generation_prompt)

    def question_with_images(self, text: str, num_images: int) -> str:
        return question_with_images(text, num_images)

    def stop_token_ids(self) -> list[int]:
        """generation_config.json's EOS ids (<|im_end|>, <|endoftext|>) and <|im_end|>."""
        ids = list(self._cfg.generation_eos)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if im_end is not None and im_end != self.tokenizer.unk_token_id:
            ids.append(im_end)
        return sorted(set(ids or self._cfg.llm.eos_token_ids))

    # ----------------------------------------------------------------- images

    def image_options(self, request: Mapping[str, Any], image: Mapping[str, Any]) -> str:
        lo, hi = self.min_pixels, self.max_pixels
        values = {}
        for name in ("min_pixels", "max_pixels"):
            value = image.get(name, request.get(name))
            if value is None or value == -1:
                continue
            if not is_int(value) or not lo <= value <= hi:
                raise OptionError(name, f"must be an integer within the server's range [{lo}, {hi}], got {value!r}")
            values[name] = value
        mn, mx = values.get("min_pixels", lo), values.get("max_pixels", hi)
        if mn > mx:
            raise OptionError("min_pixels" if "min_pixels" in values else "max_pixels",
                              f"gives an empty range: min_pixels {mn} > max_pixels {mx}")
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
            raise OptionError("grid_thw", f"{list(grid)}: t must be 1 (an image; videos are not supported)")
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
        positions and the delta, as transformers' get_rope_index."""
        if not spans:
            return {}
        if any(len(g) != 3 for g in grids):
            raise PromptError("Qwen2-VL image embeddings need their grid (t, h, w) for the positions")
        pos, delta = rope_index(len(ids), spans, grids, self._cfg.vision.spatial_merge_size)
        return {"rope_positions": torch.from_numpy(pos), "rope_delta": delta}
