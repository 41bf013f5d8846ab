"""Messages between the server's processes: ids, lengths and flags only, never tensors.

Who sends what to whom, each on its own FIFO pipe:

    HTTP → visual:    Submit (a request with images to encode) | Abort
    HTTP → router:    Submit (text-only, or every image already embedded) | Abort
    visual → router:  Submit (its images are encoded) | Abort (of a request already forwarded)
    visual → HTTP:    Failure (an image could not be encoded) | VisualStats
    router → HTTP:    Outputs (one per engine step) | Failure (refused at arrival) | RouterStats

A request's abort travels on the pipe that carried the request, and the visual server
forwards it behind the request, so no process ever sees an abort before its request: an
abort for an id a process does not hold means the request already ended there. Aborts are
not answered: HTTP sends one only once it has stopped reading the request's stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Protocol, Sequence, TypeVar

from .engine.sampling import SamplingParams


@dataclass
class ImageRef:
    record_id: int
    emb_name: str  # shared-memory segment holding [n_tokens, hidden] embeddings
    img_name: str  # segment holding the image file bytes (until the embedding exists)
    n_tokens: int
    img_bytes: int
    needs_vit: bool
    options: str  # the model family's option key for this image (part of the cache key)
    grid: tuple[int, ...] = ()  # family metadata from the image's header, for rope_inputs (Qwen2-VL: t, h, w)
    # Embeddings sent by the client: a segment the HTTP process owns (not a cache record,
    # record_id 0) and unlinks when the request ends; never goes through the ViT.
    precomputed: bool = False
    label: str = ""  # how errors name it in its request ("image 0", "video 1"); "" → "image {index}"


@dataclass
class ServeRequest:
    req_id: int
    input_ids: list[int]
    params: SamplingParams
    images: list[ImageRef] = field(default_factory=list)
    # (start, length) of each image's tokens, from the family's prompt expansion
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    # Each image's content identity for the KV prefix cache: its embedding-cache key
    # (md5:<options>), or a digest of precomputed embeddings; full width, never truncated
    image_keys: list[str] = field(default_factory=list)
    # time.monotonic() stamps, one clock for every process on the host: the TTFT breakdown of /metrics
    t_arrival: float = 0.0  # the HTTP handler started on this request
    t_sent: float = 0.0  # handed to the next process (HTTP → visual or router, visual → router)


# ---------------------------------------------------------------------------------------
# Requests and aborts


@dataclass
class Submit:
    req: ServeRequest


@dataclass
class Abort:
    req_id: int


# ---------------------------------------------------------------------------------------
# Results


@dataclass
class Token:
    """One generated token of one request; the request's last carries its finish reason."""

    req_id: int
    token_id: int
    logprob: float
    finish_reason: str | None = None  # "stop" (a stop id or a finished grammar) | "length" | "error"
    top: list[tuple[int, float]] | None = None  # top_logprobs alternatives (id, logprob), best first
    prompt_cache_len: int | None = None  # on a request's first token: prompt tokens reused from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


FailureKind = Literal["error", "invalid", "unavailable"]


@dataclass
class Failure:
    """A request ends without (more) tokens. `kind` picks the HTTP status: "invalid" is the
    client's input (400), "unavailable" a server that cannot serve now (503), "error" a 500."""

    req_id: int
    kind: FailureKind
    message: str


class _TokenLike(Protocol):  # Token, or the engine's StepOutput
    req_id: int
    token_id: int
    logprob: float
    finish_reason: str | None
    top: list[tuple[int, float]] | None
    prompt_cache_len: int | None


@dataclass
class Outputs:
    """The tokens of one engine step, as columns. The router sends one per step: 256 Token
    objects take ~0.5 ms to pickle and unpickle, these lists ~0.03 ms (as the old tuples)."""

    req_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reasons: dict[int, str]  # req id → reason, for the requests this step ended
    # Sparse column: position in this message → that token's top_logprobs alternatives, only for
    # the tokens of requests that asked for them (None when none did).
    tops: dict[int, list[tuple[int, float]]] | None = None
    # req id → prompt tokens reused from the prefix cache, for the requests this step started
    prompt_cache_lens: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, tokens: Sequence[_TokenLike]) -> Outputs:
        tops = {i: t.top for i, t in enumerate(tokens) if t.top is not None} or None
        return cls([t.req_id for t in tokens], [t.token_id for t in tokens], [t.logprob for t in tokens],
                   {t.req_id: t.finish_reason for t in tokens if t.finish_reason is not None}, tops,
                   {t.req_id: t.prompt_cache_len for t in tokens if t.prompt_cache_len is not None})

    def __len__(self) -> int:
        return len(self.req_ids)

    def __iter__(self) -> Iterator[Token]:
        reasons, tops, cached = self.finish_reasons, self.tops, self.prompt_cache_lens
        for i, (rid, tok, lp) in enumerate(zip(self.req_ids, self.token_ids, self.logprobs)):
            yield Token(rid, tok, lp, reasons.get(rid), tops.get(i) if tops else None, cached.get(rid))


# ---------------------------------------------------------------------------------------
# Stats, every 0.2 s: exactly what /metrics renders (http/metrics.py reads them as dicts)


@dataclass
class RouterStats:
    kv_used: int = 0
    kv_total: int = 0
    waiting: int = 0
    running: int = 0
    ttft_router_s: float = 0.0  # arrival here → first token, summed over requests
    ttft_router_n: int = 0
    # KV prefix cache
    prompt_cache_hit_tokens: int = 0  # prompt tokens served from the cache, summed over admitted requests
    prompt_cache_tokens: int = 0  # tokens (KV slots) the cache holds now
    prompt_cache_evicted_tokens: int = 0


@dataclass
class VisualStats:
    vit_images: int = 0
    vit_tiles: int = 0
    vit_seconds: float = 0.0  # preprocess + encode
    vit_preprocess_seconds: float = 0.0
    vit_encode_seconds: float = 0.0
    vit_batch_sizes: dict[int, int] = field(default_factory=dict)  # images per batch → batches
    ttft_visual_s: float = 0.0  # arrival here → forwarded to the router, summed over requests
    ttft_visual_n: int = 0
    remote_encoders: dict[str, int] = field(default_factory=dict)  # --visual_remote address → 1 up / 0 down


ToVisual = Submit | Abort
ToRouter = Submit | Abort
FromVisual = Failure | VisualStats
FromRouter = Outputs | Failure | RouterStats

_M = TypeVar("_M", contravariant=True)


class Sender(Protocol[_M]):
    """The sending end of a pipe: a multiprocessing Connection, or a list in the tests."""

    def send(self, msg: _M, /) -> None: ...
