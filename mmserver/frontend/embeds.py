"""Precomputed image embeddings as input, in place of an image.

An embeddings input is one float tensor `[n_tokens, hidden]`: the rows that the model's
own vision encoder would produce for an image (`hidden` is the LLM's hidden size), with
`n_tokens` a positive multiple of the family's `embeds_row_multiple` (the rows of the
smallest unit its encoder emits); the image then fills `n_tokens` prompt positions. Any
float dtype is accepted and cast to the model's dtype. Over HTTP it travels as the base64 of a safetensors file holding
exactly that one tensor; in the pipeline it is a torch tensor or any DLPack tensor.

The server and the pipeline validate with the same functions here.
"""

from __future__ import annotations

import binascii
import hashlib
from typing import Any

import torch

from .b64 import b64decode_strict


class EmbedsError(ValueError):
    """An embeddings input that cannot stand for an image (wrong shape, dtype or file)."""


def is_tensor(obj: Any) -> bool:
    """A torch tensor or anything that speaks DLPack (numpy, cupy, jax, …)."""
    return isinstance(obj, torch.Tensor) or hasattr(obj, "__dlpack__")


def as_torch(obj: Any, index: int) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    try:
        return torch.from_dlpack(obj)
    except Exception as e:  # DLPack producers raise assorted types
        raise EmbedsError(f"embeds {index}: cannot read as a tensor via DLPack ({type(e).__name__}: {e})") from None


def check(t: torch.Tensor, index: int, row_multiple: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Validate `[k·row_multiple, hidden]`, float and finite; return it in `dtype`, contiguous."""
    rows_ok = t.ndim == 2 and t.shape[0] > 0 and t.shape[0] % row_multiple == 0
    if not rows_ok or t.shape[1] != hidden:
        raise EmbedsError(f"embeds {index}: shape {tuple(t.shape)} is not [k·{row_multiple}, {hidden}]")
    if not t.is_floating_point():
        raise EmbedsError(f"embeds {index}: dtype {t.dtype} is not a float type")
    if not bool(torch.isfinite(t).all()):
        raise EmbedsError(f"embeds {index}: contains NaN or infinity")
    return t.to(dtype).contiguous()


def digest(t: torch.Tensor) -> str:
    """A content key for a tensor (dtype, shape and bytes; sha256, full width): the prefix
    cache's image key of precomputed embeddings, so that equal inputs share KV and others never do."""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def b64decode(data: str, index: int) -> bytes:
    try:
        return b64decode_strict(data)
    except (binascii.Error, ValueError) as e:
        raise EmbedsError(f"embeds {index}: invalid base64 data ({e})") from None


def from_safetensors(raw: bytes, index: int) -> torch.Tensor:
    """The single tensor of a safetensors file's bytes."""
    from safetensors.torch import load

    try:
        tensors = load(raw)
    except Exception as e:  # the parser raises its own error types
        raise EmbedsError(f"embeds {index}: not a safetensors file ({type(e).__name__}: {e})") from None
    if len(tensors) != 1:
        raise EmbedsError(f"embeds {index}: the safetensors file holds {len(tensors)} tensors; expected exactly one")
    return next(iter(tensors.values()))
