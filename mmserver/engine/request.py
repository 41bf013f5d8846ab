"""A request's state as the engine sees it (`Request`) and what one step says about it (`StepOutput`).

Plain data shared by the scheduler (which decides what runs and updates the counters) and
the model runner (which reads prompts and image rows to build batches);
neither owns the other's state, so both import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .admission import Footprint
from .sampling import SamplingParams


class RequestError(ValueError):
    """A request the engine cannot run (too long, bad parameters)."""


# eq=False: requests are compared by identity (`r in running`, `waiting.remove(r)`), never field by field.
@dataclass(eq=False)
class Request:
    req_id: int
    prompt_ids: list[int]
    params: SamplingParams
    # Image embedding rows ([n_image_tokens, H]), in prompt order; row k replaces the embedding
    # of the prompt token at image_offsets[k].
    image_embeds: torch.Tensor | None = None
    image_offsets: list[int] = field(default_factory=list)  # prompt positions of image tokens
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    row: int = -1  # token-table row while running
    num_cached: int = 0  # tokens whose K/V are in the pool (or being written by a launched step)
    finished: bool = False
    finish_reason: str | None = None
    pending: int = 0  # tokens sampled on the device, not yet in output_ids (overlap schedule)
    pending_index: int = -1  # row of the latest of them in its step's sampled tokens

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens, the pending ones included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def num_generated(self) -> int:
        """Generated tokens, the pending ones included."""
        return len(self.output_ids) + self.pending

    @property
    def footprint(self) -> Footprint:
        return Footprint(self.num_tokens, self.params.max_new_tokens - self.num_generated)


@dataclass
class StepOutput:
    req_id: int
    token_id: int
    logprob: float
    finished: bool
    finish_reason: str | None


def span_offsets(spans: Sequence[tuple[int, int]], n_prompt: int) -> list[int]:
    """Every prompt position covered by `spans`, checked to be in order, disjoint and in the prompt."""
    offsets: list[int] = []
    end = 0
    for start, length in spans:
        if start < end or length <= 0 or start + length > n_prompt:
            raise RequestError(f"image span ({start}, {length}) is out of order, empty or past the prompt "
                               f"({n_prompt} tokens)")
        offsets.extend(range(start, start + length))
        end = start + length
    return offsets
