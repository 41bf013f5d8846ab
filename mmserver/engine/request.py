"""A request's state as the engine sees it (`Request`) and what one step says about it (`StepOutput`).

Plain data shared by the scheduler (which decides what runs and updates the counters) and
the model runner (which reads prompts, image rows and RoPE positions to build batches);
neither owns the other's state, so both import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np
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
    # RoPE positions of the prompt tokens, [P, len(prompt)] (None: 0..L-1 in one row); a token
    # after the prompt at cache position p has RoPE position p + rope_delta in every row.
    rope_positions: np.ndarray | None = None
    rope_delta: int = 0
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    row: int = -1  # token-table row while running
    num_cached: int = 0  # tokens whose K/V are in the pool (or being written by a launched step)
    finished: bool = False
    finish_reason: str | None = None
    pending: int = 0  # tokens sampled on the device, not yet in output_ids (overlap schedule)
    pending_index: int = -1  # row of the latest of them in its step's sampled tokens
    # Structured output: the request's grammar matcher (mmserver.structured.GrammarState), or None.
    grammar: Any = None
    # Prefix cache: each prompt position's key (its id, or (image key, offset) at an image
    # token; None with the cache off), the cached prefix taken at admission and its tree node.
    prompt_keys: list | None = None
    prompt_cache_len: int = 0
    prefix_node: Any = None

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
        """Its own KV: a cached prefix it shares is counted once, by the scheduler."""
        return Footprint(self.num_tokens - self.prompt_cache_len, self.params.max_new_tokens - self.num_generated)

    def cache_keys(self, n: int) -> list:
        """The prefix-cache keys of its first n positions (prompt, then generated ids)."""
        return (self.prompt_keys + self.output_ids)[:n]

    @property
    def rope_rows(self) -> int:
        """P: rows of RoPE positions (1 for plain RoPE)."""
        return 1 if self.rope_positions is None else self.rope_positions.shape[0]

    def rope_span(self, start: int, n: int) -> np.ndarray:
        """[P, n] int64 RoPE positions of cache positions start..start+n-1."""
        out = np.arange(start, start + n, dtype=np.int64)[None]
        in_prompt = max(0, min(n, len(self.prompt_ids) - start))
        if self.rope_positions is not None:
            out = np.repeat(out, self.rope_rows, axis=0)
            out[:, :in_prompt] = self.rope_positions[:, start:start + in_prompt]
        out[:, in_prompt:] += self.rope_delta
        return out


@dataclass
class StepOutput:
    req_id: int
    token_id: int
    logprob: float
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" (the grammar refused the token)
    # The request's top_logprobs alternatives for this token, (id, raw logprob), best first; None
    # when it asked for none.
    top: list[tuple[int, float]] | None = None
    prompt_cache_len: int | None = None  # on a request's first token: prompt tokens reused from the prefix cache


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


def rope_inputs(rope_positions: torch.Tensor | None, rope_delta: int, n_prompt: int, max_new_tokens: int,
                max_positions: int) -> np.ndarray | None:
    """`add_request`'s RoPE arguments checked: the prompt's positions as a [P, n_prompt] int64 host
    array (None stays None), every position a request can reach within [0, max_positions)."""
    if not isinstance(rope_delta, int) or isinstance(rope_delta, bool):
        raise RequestError(f"rope_delta must be an integer, got {rope_delta!r}")
    if rope_positions is None:
        if rope_delta == 0:
            return None
        lowest, highest = 0, n_prompt - 1
    else:
        if rope_positions.dim() != 2 or rope_positions.shape[0] < 1 or rope_positions.shape[1] != n_prompt:
            raise RequestError(f"rope_positions must be [P, {n_prompt}] (one column per prompt token), "
                               f"got {list(rope_positions.shape)}")
        if rope_positions.dtype.is_floating_point or rope_positions.dtype.is_complex:
            raise RequestError(f"rope_positions must be integers, got {rope_positions.dtype}")
        lowest, highest = int(rope_positions.min()), int(rope_positions.max())
    # The last generated token is never fed back: decode positions stop at n_prompt + max_new_tokens - 2.
    highest = max(highest, n_prompt + max_new_tokens - 2 + rope_delta)
    lowest = min(lowest, n_prompt + rope_delta)
    if lowest < 0 or highest >= max_positions:
        raise RequestError(f"RoPE positions run from {lowest} to {highest}, outside the model's "
                           f"[0, {max_positions})")
    return None if rope_positions is None else rope_positions.detach().cpu().numpy().astype(np.int64)


def prompt_cache_keys(prompt_ids: Sequence[int], spans: Sequence[tuple[int, int]],
                      image_keys: Sequence[Hashable] | None) -> list:
    """Each prompt position's prefix-cache key: its id, or `(image key, k)` at the k-th token of
    an image. Images without a key get one that equals nothing else (their KV is never shared)."""
    keys: list = list(prompt_ids)
    if image_keys is None:
        image_keys = [object() for _ in spans]
    elif len(image_keys) != len(spans):
        raise RequestError(f"{len(image_keys)} image keys for {len(spans)} images")
    for (start, length), key in zip(spans, image_keys):
        key = key or object()  # "" (no key known): shares nothing
        keys[start:start + length] = [(key, k) for k in range(length)]
    return keys
