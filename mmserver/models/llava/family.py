"""LLaVA-1.5 and LLaVA-NeXT (llava-hf checkpoints) as a `ModelFamily`: a CLIP ViT-L/336 tower and
a 2-layer GELU projector in front of a LLaMA / Vicuna or Mistral decoder (the shared one).

LLaVA-1.5: one 336×336 tile per image, 576 tokens. LLaVA-NeXT: anyres tiles, a token count that
depends on the image's size (see `preprocess.py`), `image_newline` rows. No image options: every
image is processed the same way (the option key is "anyres" / "clip"). Plain RoPE positions.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigError
from ..family import COMPONENTS, ImagePlan, ImageSource, ModelFamily, VisionInput
from ..parallel import TPGroup, load_for_rank
from .config import LLAVA_NEXT, LlavaConfig, load_config
from .preprocess import num_tokens, tiles_uint8
from .prompt import expand_prompt, image_spans, render_chat, template_kind


class LlavaFamily(ModelFamily):
    name = "llava"

    def __init__(self, model_dir: str | os.PathLike, trust_remote_code: bool = False):
        super().__init__(model_dir, trust_remote_code)
        self._cfg = load_config(self.model_dir)
        self.template = template_kind(self._cfg.chat_template, self._cfg.backbone)

    @property
    def config(self) -> LlavaConfig:
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
        from .vision import LlavaVisionEncoder

        return LlavaVisionEncoder(self._cfg, weights, tp)

    # ----------------------------------------------------------------- prompts

    def check_tokenizer(self, tokenizer) -> None:
        got = tokenizer.convert_tokens_to_ids("<image>")
        if got != self._cfg.image_token_id:
            raise ConfigError(f"tokenizer and config.json disagree on <image>: {got} in the tokenizer, "
                              f"{self._cfg.image_token_id} in the config (image_token_index)")

    def expand_prompt(self, prompt: str, token_counts: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        return expand_prompt(self.tokenizer, prompt, token_counts, self._cfg.image_token_id)

    def find_spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        return image_spans(ids, self._cfg.image_token_id)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.template, messages, add_generation_prompt)

    def stop_token_ids(self) -> list[int]:
        """generation_config.json's EOS ids and the tokenizer's </s>."""
        ids = list(self._cfg.generation_eos)
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            ids.append(eos)
        return sorted(set(ids or self._cfg.llm.eos_token_ids))

    # ----------------------------------------------------------------- images

    def image_options(self, request: Mapping[str, Any], image: Mapping[str, Any]) -> str:
        return "anyres" if self._cfg.kind == LLAVA_NEXT else "clip"

    def plan_image(self, width: int, height: int, options: str) -> ImagePlan:
        n = num_tokens(self._cfg, width, height)
        return ImagePlan(n, (height, width) if self._cfg.kind == LLAVA_NEXT else ())

    def preprocess(self, image: ImageSource, options: str, index: int = 0, normalize: bool = False) -> VisionInput:
        from .preprocess import normalize as finish

        tiles, (h, w) = tiles_uint8(self._cfg, image, index)
        n = num_tokens(self._cfg, w, h, index)
        grid = (h, w) if self._cfg.kind == LLAVA_NEXT else ()
        return VisionInput(finish(tiles, self._cfg) if normalize else tiles, n, grid)

    def warmup_input(self) -> VisionInput:
        side = self._cfg.vision.image_size
        if self._cfg.kind == LLAVA_NEXT:
            h, w = self._cfg.pinpoints[0]
            tiles = torch.zeros((1 + (h // side) * (w // side), side, side, 3), dtype=torch.uint8)
            return VisionInput(tiles, num_tokens(self._cfg, w, h), (h, w))
        return VisionInput(torch.zeros((1, side, side, 3), dtype=torch.uint8), self._cfg.tile_tokens)
