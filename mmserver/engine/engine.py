"""The generation engine: requests in, one token per running request per step out.

Each `step()` is three moves, as in nano-vllm: the `Scheduler` admits what fits (peak-KV
admission) and plans the step (prefill chunks and decode tokens of every running request in
one forward); the `ModelRunner` builds the batch, runs the forward and samples; the scheduler
takes the sampled tokens back and retires finished requests at once (continuous batching).
The same engine runs in-process (the pipeline) and inside the server's model worker.

Overlap schedule (`EngineConfig.overlap_schedule`, on by default on CUDA): `step()` launches
step N's forward and sampling, and only then waits for step N-1's sampled tokens and does
their bookkeeping (finish checks, outputs), so the host builds and retires batches while the
GPU computes. Step N reads the tokens of step N-1 on the device (the scheduler's module doc
says how); a batch with a request that needs its tokens on the host (penalties) waits for
step N-1 first. Each step's outputs come back one `step()` later; `has_work()` stays true until
they have. The outputs are the same with the schedule on or off.

Structured outputs: a request whose `SamplingParams.structured` is set gets a grammar matcher
(`GrammarState`) at `add_request`, from one `StructuredCompiler` per engine (per stop-id set),
built on the first such request from the tokenizer given to the engine (the tokenizer, or a
function returning it) and the model's vocabulary (the LM head's rows). Its rows are masked in
the sampler, and it accepts each token when the token reaches the host (`Scheduler.postprocess`).
Requests without one, and `top_logprobs` 0, take the same path as before.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, Hashable, Sequence

import torch

from ..models.llm.decoder import DecoderLM
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs, graphs_enabled
from .kv_pool import allocate_kv
from .model_runner import Launched, ModelRunner
from .prefix_cache import PrefixCache
from .request import Request, RequestError, StepOutput, prompt_cache_keys, rope_inputs, span_offsets
from .sampling import Sampler, SamplingParams, make_generator
from .scheduler import Scheduler

__all__ = ["Engine", "EngineConfig", "RequestError", "StepOutput"]


class Engine:
    """The public face of the engine: a Scheduler and a ModelRunner sharing one KV pool and token table."""

    def __init__(self, llm: DecoderLM, config: EngineConfig, tokenizer: Any | Callable[[], Any] | None = None):
        self.llm = llm
        self._tokenizer = tokenizer  # for structured outputs: a tokenizer, or a function returning one
        self._compilers: dict[tuple[int, ...], Any] = {}  # stop ids → StructuredCompiler, made on first use
        self.config = config
        self.device = llm.device
        self.kv, self.table = allocate_kv(llm, config)
        if not config.disable_dynamic_prompt_cache:
            self.kv.cache = PrefixCache()
        self.scheduler = Scheduler(config, self.kv, self.table)
        self.runner = ModelRunner(llm, config, self.kv, self.table)
        self._ids = itertools.count()
        self._inflight: deque[Launched] = deque()  # launched steps whose tokens are not back yet
        overlap = config.overlap_schedule
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        if graphs_enabled(config.cuda_graphs, self.device):
            self.graphs = self.runner.capture_graphs()

    # ----------------------------------------------------------------------------------
    # Public API

    def add_request(self, prompt_ids: list[int], params: SamplingParams, image_embeds: torch.Tensor | None = None,
                    image_spans: Sequence[tuple[int, int]] = (), req_id: int | None = None,
                    rope_positions: torch.Tensor | None = None, rope_delta: int = 0,
                    image_keys: Sequence[Hashable] | None = None) -> int:
        """Queue a request. `image_spans` are the (start, length) prompt ranges whose embeddings
        are replaced by `image_embeds` rows, in order (the model family's prompt expansion says
        where its images are; the engine never looks at token ids for that).

        `image_keys` (one per span) are the images' content identities for the prefix cache
        (the embedding-cache key: md5 of the bytes and every option that changes the
        embedding); an image without one shares no KV with anything.

        `rope_positions` ([P, len(prompt_ids)] integers; None: 0..L-1) are the prompt tokens'
        RoPE positions and `rope_delta` shifts every later token's: the one at cache position p
        gets p + rope_delta in each of the P rows. A model family with its own positions (M-RoPE)
        computes both; the KV cache is indexed by cache position whatever they are."""
        params.validate()
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise RequestError("prompt is empty")
        self.scheduler.check_length(n_prompt, params)
        offsets = span_offsets(image_spans, n_prompt)
        n_rows = image_embeds.shape[0] if image_embeds is not None else 0
        if n_rows != len(offsets):
            raise RequestError(f"prompt has {len(offsets)} image tokens but {n_rows} image embedding rows were given")
        rope = rope_inputs(rope_positions, rope_delta, n_prompt, params.max_new_tokens,
                           self.llm.cfg.max_position_embeddings)
        grammar = self._grammar(params) if params.structured is not None else None
        if image_keys is not None and len(image_keys) != len(image_spans):
            raise RequestError(f"{len(image_keys)} image keys for {len(image_spans)} images")
        keys = prompt_cache_keys(prompt_ids, image_spans, image_keys) if self.kv.cache is not None else None
        rid = next(self._ids) if req_id is None else req_id
        self.scheduler.add(Request(rid, list(prompt_ids), params, image_embeds=image_embeds if n_rows else None,
                                   image_offsets=offsets, rope_positions=rope, rope_delta=rope_delta,
                                   generator=make_generator(params.seed, self.device), prompt_keys=keys, grammar=grammar))
        return rid

    def _grammar(self, params: SamplingParams) -> Any:
        """A fresh matcher for `params.structured` (compiled once per spec: the compiler's LRU)."""
        from ..structured import StructuredCompiler, StructuredOutputError

        key = tuple(params.stop_token_ids)
        compiler = self._compilers.get(key)
        if compiler is None:
            if self._tokenizer is None:
                raise RequestError("structured outputs need the engine to have the tokenizer")
            if callable(self._tokenizer) and not hasattr(self._tokenizer, "convert_ids_to_tokens"):
                self._tokenizer = self._tokenizer()  # a factory: load it once, now
            compiler = StructuredCompiler(self._tokenizer, self.llm.cfg.vocab_size, list(key))
            self._compilers[key] = compiler
        try:
            return compiler.new_state(params.structured)
        except StructuredOutputError as e:
            raise RequestError(str(e)) from None

    def abort(self, req_id: int, reason: str = "abort") -> None:
        """Finish a request now (client gone, stop string seen); frees its slots at once."""
        self.scheduler.abort(req_id, reason)

    def has_work(self) -> bool:
        """Requests waiting or running (a running one may only await its last pending token)."""
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Launch the next forward; return the tokens of the step that just came back (this one's
        without the overlap schedule, the previous one's with it)."""
        self.scheduler.admit()
        outs: list[StepOutput] = []
        if self._inflight and self.scheduler.waits_for_host_tokens():
            outs += self._postprocess(self._inflight.popleft())
        plan = self.scheduler.schedule()
        if plan:
            self._inflight.append(self.runner.launch(plan, self._inflight[-1] if self._inflight else None))
        keep = 1 if self.overlap and plan else 0
        while len(self._inflight) > keep:
            outs += self._postprocess(self._inflight.popleft())
        return outs

    def _postprocess(self, step: Launched) -> list[StepOutput]:
        return self.scheduler.postprocess(*self.runner.resolve(step))

    # ----------------------------------------------------------------------------------
    # The parts' state, where callers and tests look for it

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.kv.cache

    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def requests(self) -> dict[int, Request]:
        """Requests not finished yet, by id."""
        return self.scheduler.requests

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self.runner.graphs

    @graphs.setter
    def graphs(self, graphs: DecodeGraphs | None) -> None:
        self.runner.graphs = graphs

    @property
    def sampler(self) -> Sampler:
        return self.runner.sampler

    @sampler.setter
    def sampler(self, sampler: Sampler) -> None:
        self.runner.sampler = sampler
