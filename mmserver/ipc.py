"""Messages between the server's processes: ids, lengths and flags only, never tensors.

HTTP → visual:   ("req", ServeRequest)
HTTP → router:   ("req", ServeRequest) | ("abort", req_id)
visual → router: ("req", ServeRequest) | ("fail", req_id, "invalid:<message>" | "error:<message>")
visual → HTTP:   ("stats", dict)
router → HTTP:   ("out", [TokenOut, ...]) | ("stats", dict)
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class ServeRequest:
    req_id: int
    input_ids: list[int]
    params: SamplingParams
    images: list[ImageRef] = field(default_factory=list)
    # (start, length) of each image's tokens, from the family's prompt expansion
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    # time.monotonic() stamps, one clock for every process on the host: the TTFT breakdown of /metrics
    t_arrival: float = 0.0  # the HTTP handler started on this request
    t_sent: float = 0.0  # handed to the next process (HTTP → visual or router, visual → router)


# (req_id, token_id, logprob, finished, finish_reason); on failure finish_reason is "error:<message>"
# (a 500), "invalid:<message>" (the client's input, a 400) or "unavailable:<message>" (a 503)
TokenOut = tuple[int, int, float, bool, "str | None"]
