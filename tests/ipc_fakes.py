"""Stand-ins for what the processes' state machines talk to (engine, ViT workers, cache,
tokenizer), so Router, VisualServer and Streams can be driven in-process, one message at a
time, with their pipes replaced by lists."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from mmserver.engine.engine import RequestError
from mmserver.engine.sampling import SamplingParams
from mmserver.ipc import ImageRef, ServeRequest, Token
from mmserver.visual.workers import BatchResult

EOS = 3
MAX_REQ_LEN = 64


def image_ref(record_id: int, needs_vit: bool = True) -> ImageRef:
    """An ImageRef with the fields the visual server reads; the others (preprocessing
    options, which the server only passes on) are left None."""
    required = {f.name: None for f in dataclasses.fields(ImageRef)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return ImageRef(**{**required, "record_id": record_id, "emb_name": f"emb-{record_id}",
                       "img_name": f"img-{record_id}", "n_tokens": 256, "img_bytes": 10, "needs_vit": needs_vit})


def request(req_id: int, text: str = "hi", images: tuple[ImageRef, ...] = (), **params) -> ServeRequest:
    params.setdefault("max_new_tokens", 16)
    return ServeRequest(req_id, [ord(c) for c in text], SamplingParams(**params), list(images))


class ListPipe(list):
    """A pipe's sending end that keeps what was sent, in order."""

    def send(self, msg) -> None:
        self.append(msg)


class FakeEngine:
    """Echoes each request's prompt back, one token per step, ending with "stop" on EOS (or
    "length" at max_new_tokens). Holds a request from add_request until it ends."""

    def __init__(self):
        self.requests: dict[int, list[int]] = {}  # req id → tokens still to come
        self.waiting: list = []
        self.running: list = []
        self.kv = SimpleNamespace(used=0, num_slots=MAX_REQ_LEN)
        self.prefix_cache = None

    def add_request(self, prompt_ids, params, *, req_id: int, **image_inputs) -> int:
        if len(prompt_ids) + params.max_new_tokens > MAX_REQ_LEN:
            raise RequestError(f"exceeds max_req_total_len {MAX_REQ_LEN}")
        self.requests[req_id] = list(prompt_ids)[:params.max_new_tokens]
        return req_id

    def abort(self, req_id: int) -> None:
        self.requests.pop(req_id, None)

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[Token]:
        outs = []
        for rid, left in list(self.requests.items()):
            tok = left.pop(0)
            reason = "stop" if tok == EOS else "length" if not left else None
            if reason:
                del self.requests[rid]
            outs.append(Token(rid, tok, -0.5, reason))
        return outs


class CharTokenizer:
    """One character per token id; EOS is special."""

    all_special_ids = [EOS]

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == EOS))


class FakeWorker:
    """A ViT worker group whose batches finish when the test says so."""

    def __init__(self):
        self.conn = None
        self.busy = False
        self.prefetched: list[int] = []
        self.forgotten: list[int] = []
        self.batches: list[list[int]] = []  # record ids of each dispatched batch
        self._result: BatchResult | None = None

    def prefetch(self, ref: ImageRef) -> None:
        self.prefetched.append(ref.record_id)

    def forget(self, record_id: int) -> None:
        self.forgotten.append(record_id)

    def dispatch(self, refs: list[ImageRef]) -> None:
        self.busy = True
        self.batches.append([r.record_id for r in refs])

    def finish(self, done=(), failed=()) -> None:
        self._result = BatchResult(done=list(done), failed=list(failed))

    def poll(self) -> BatchResult | None:
        result, self._result = self._result, None
        if result is not None:
            self.busy = False
        return result


class FakeCache:
    def __init__(self):
        self.marked: list[int] = []

    def mark_embedding(self, ids: list[int]) -> None:
        self.marked.extend(ids)
