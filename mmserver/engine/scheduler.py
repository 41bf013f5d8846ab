"""The scheduler: which requests run in a step, which of their tokens, and what their tokens mean.

It works on `Request`s and plain numbers only, never on tensors (the model runner turns its
`StepPlan` into tensors), so every policy lives in one place:

* admission: FIFO while the peak-KV rule (`admission.fits`) and the running/row limits allow;
* the chunk budget: each step prefills at most `batch_max_tokens` prompt tokens beside the
  running decodes (chunked prefill);
* the length rule (max_new_tokens / max_req_len) and the finish rule (stop ids, min_new_tokens);
* the prefix cache (`prefix_cache`, unless `disable_dynamic_prompt_cache`): at admission a
  request takes the longest cached prefix of its prompt (at most all but the last token, which
  must run to give logits), locks it and starts its prefill after it; when it finishes, its
  keyed positions with KV (prompt and output, not the last sampled token, which was never fed)
  go into the cache and its lock is dropped. Admission counts a shared prefix once and cached
  slots nobody uses as free (they are evicted when the pool needs them);
* the overlap schedule's bookkeeping. A request's token sampled in step N is *pending* until
  N's results reach the host; step N+1 may feed it already, as the input id
  `pending_input_id(k)` (row k of step N's sampled tokens), which the runner swaps in on the
  device. A request whose pending token is its last by length is left out of the next step;
  one that stops on EOS while a step holding its next token is in flight has that token dropped;
  and a request that `needs_host_tokens` makes the engine wait for the pending step first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .admission import fits
from .config import EngineConfig
from .kv_pool import KVPool, TokenTable
from .request import Request, RequestError, StepOutput
from .sampling import SamplingParams


def pending_input_id(k: int) -> int:
    """The input id that stands for row k of the previous step's sampled tokens (still on the device)."""
    return -1 - k


@dataclass
class StepPlan:
    """One forward's work, as plain data. Row i runs `requests[i]`'s cache positions
    starts[i] .. starts[i] + num_tokens[i] - 1; if produces[i] its last one yields a token."""

    requests: list[Request] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    produces: list[bool] = field(default_factory=list)
    # Per row: the input id of a decode row (its last token, or a pending_input_id); 0 for prompt rows.
    decode_inputs: list[int] = field(default_factory=list)
    # Per row: tokens its request had generated before this step, pending ones included (min_new_tokens).
    num_generated: list[int] = field(default_factory=list)
    all_decode: bool = False

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def reads_pending(self) -> bool:
        """Some input id is a pending token of the previous step."""
        return any(i < 0 for i in self.decode_inputs)

    def add(self, r: Request, start: int, n: int, decode_input: int) -> None:
        self.requests.append(r)
        self.starts.append(start)
        self.num_tokens.append(n)
        self.produces.append(start + n == r.num_tokens)
        self.decode_inputs.append(decode_input)
        self.num_generated.append(r.num_generated)


class Scheduler:
    """The waiting queue, the running requests and every rule about them (see the module doc)."""

    def __init__(self, config: EngineConfig, kv: KVPool, table: TokenTable):
        self.config = config
        self.kv, self.table = kv, table
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}

    # ----------------------------------------------------------------------------------
    # Requests in and out

    def check_length(self, n_prompt: int, params: SamplingParams) -> None:
        """Refuse a request that could never run (RequestError)."""
        total = n_prompt + params.max_new_tokens
        if total > self.config.max_req_len:
            raise RequestError(f"prompt ({n_prompt} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                               f"exceeds max_req_total_len {self.config.max_req_len}")
        if total > self.config.max_total_tokens:
            raise RequestError(f"request needs {total} KV slots but the pool has {self.config.max_total_tokens}")

    def add(self, r: Request) -> None:
        self.requests[r.req_id] = r
        self.waiting.append(r)

    def abort(self, req_id: int, reason: str) -> None:
        r = self.requests.get(req_id)
        if r is None or r.finished:
            return
        if r in self.waiting:
            self.waiting.remove(r)
        self._finish(r, reason)

    def has_work(self) -> bool:
        """Requests waiting or running (a running one may only await its last pending token)."""
        return bool(self.waiting or self.running)

    # ----------------------------------------------------------------------------------
    # A step: admit, plan, and take the sampled tokens back

    def admit(self) -> None:
        cache = self.kv.cache
        while self.waiting and len(self.running) < self.config.max_requests and self.table.free_rows:
            cand = self.waiting[0]
            capacity = self.config.max_total_tokens
            if cache is not None:  # its cached prefix, and the shared prefixes in use, count once
                node, slots = cache.match(cand.prompt_keys, len(cand.prompt_ids) - 1)
                cand.prompt_cache_len = len(slots)
                capacity -= cache.locked + cache.unlocked_on_path(node)
            if not fits([r.footprint for r in self.running], cand.footprint, capacity):
                break  # FIFO: a big request is not overtaken, so it cannot starve
            self.waiting.popleft()
            cand.row = self.table.alloc_row()
            if cache is not None:
                cache.lock(node)
                cache.hit_tokens += len(slots)
                cand.prefix_node = node
                cand.num_cached = len(slots)
                self.table.record_prefix(cand.row, slots)
            self.running.append(cand)

    def needs_host_tokens(self, r: Request) -> bool:
        """`r`'s next token cannot be sampled before its earlier tokens are on the host
        (penalties count them there; a grammar's matcher has to accept them)."""
        return r.params.needs_host_tokens

    def waits_for_host_tokens(self) -> bool:
        """The next batch holds a request that `needs_host_tokens`: resolve the step in flight first."""
        return any(self.needs_host_tokens(r) for r in self._candidates())

    def schedule(self) -> StepPlan:
        """Plan the next forward over the running requests and mark it launched: their cached
        and pending counts move on as if it had run."""
        reqs = self._candidates()
        decodes = sum([r.num_cached >= len(r.prompt_ids) for r in reqs])
        plan = self._plan_decodes(reqs) if decodes == len(reqs) else self._plan_mixed(reqs, decodes)
        for r, start, n in zip(plan.requests, plan.starts, plan.num_tokens):
            r.num_cached = start + n
        for k, r in enumerate(r for r, p in zip(plan.requests, plan.produces) if p):
            if r.pending and self.needs_host_tokens(r):
                raise RuntimeError("a request that needs its tokens on the host is sampled while one is in flight")
            r.pending += 1
            r.pending_index = k
        return plan

    def postprocess(self, producers: list[Request], tokens: list[int], logprobs: list[float],
                    top: list[list[tuple[int, float]] | None] | None = None) -> list[StepOutput]:
        """Take a step's sampled tokens (in the order of its producing rows) and, when some row
        asked for them, their top_logprobs alternatives; retire what finished. Tokens of
        requests that finished meanwhile (EOS one step earlier, abort) are dropped.

        A request with a grammar accepts each token here, in order, before its next one is
        sampled (it `needs_host_tokens`); a token the grammar refuses ends it with "error", and
        a terminated grammar (it accepted a stop token) ends it with "stop", ignore_eos or not."""
        outs = []
        for k, (r, tok, lp) in enumerate(zip(producers, tokens, logprobs)):
            r.pending -= 1
            if r.finished:
                continue
            r.output_ids.append(tok)
            r.output_logprobs.append(lp)
            reason = self._grammar_reason(r, tok) if r.grammar is not None else None
            reason = reason or self._finish_reason(r, tok)
            if reason:
                self._finish(r, reason)
            outs.append(StepOutput(r.req_id, tok, lp, r.finished, r.finish_reason, top[k] if top else None))
            if len(r.output_ids) == 1:
                outs[-1].prompt_cache_len = r.prompt_cache_len
        return outs

    @staticmethod
    def _grammar_reason(r: Request, tok: int) -> str | None:
        if not r.grammar.accept(tok):
            return "error"
        return "stop" if r.grammar.is_terminated() else None

    # ----------------------------------------------------------------------------------
    # Rules

    def _candidates(self) -> list[Request]:
        return [r for r in self.running if not self._ends_by_length(r)]

    def _plan_decodes(self, reqs: list[Request]) -> StepPlan:
        """Every request decodes one token: the steady state, built with comprehensions because
        its host time adds to every step's."""
        n = len(reqs)
        return StepPlan(reqs, [r.num_cached for r in reqs], [1] * n, [True] * n,
                        [self._decode_input(r) for r in reqs], [r.num_generated for r in reqs], all_decode=True)

    def _plan_mixed(self, reqs: list[Request], decodes: int) -> StepPlan:
        """Prefill chunks within the batch_max_tokens budget, beside every decode token."""
        budget = max(self.config.batch_max_tokens - decodes, 1)
        plan = StepPlan()
        for r in reqs:
            start = r.num_cached
            left = len(r.prompt_ids) - start
            if left <= 0:
                plan.add(r, start, 1, self._decode_input(r))
            elif budget > 0:
                n = min(left, budget)
                budget -= n
                plan.add(r, start, n, 0)
        return plan

    @staticmethod
    def _decode_input(r: Request) -> int:
        """The input id of a decode step: the last token, or the stand-in for its pending one."""
        return pending_input_id(r.pending_index) if r.pending else r.output_ids[-1]

    def _length_reached(self, r: Request, generated: int) -> bool:
        """`generated` tokens end `r` by length: max_new_tokens or max_req_len."""
        return generated >= r.params.max_new_tokens or len(r.prompt_ids) + generated >= self.config.max_req_len

    def _ends_by_length(self, r: Request) -> bool:
        """Its pending token is its last: nothing more to run."""
        return r.pending > 0 and self._length_reached(r, r.num_generated)

    def _cache(self, r: Request, held: torch.Tensor) -> torch.Tensor:
        """Put `r`'s positions with KV and a known key into the prefix cache and drop its lock;
        returns the slots that go back to the pool (past those positions, and its own copies of
        positions the cache already held).

        Position p has KV once a launched step fed its token (`held` covers those: a step still
        in flight writes before any later step reads, stream order). Its key is known on the
        host for p < prompt + output: the last sampled token, and a token still pending, were
        never fed or are not known yet, and the overlap schedule's dropped token has no KV."""
        slots = held.numpy()
        n = min(len(slots), len(r.prompt_ids) + len(r.output_ids))
        cache = self.kv.cache
        had = cache.insert(r.cache_keys(n), slots[:n])  # ≥ prompt_cache_len: r's prefix is still locked
        cache.unlock(r.prefix_node)
        r.prefix_node = None
        return torch.from_numpy(np.concatenate([slots[r.prompt_cache_len:had], slots[n:]]))

    def _finish_reason(self, r: Request, tok: int) -> str | None:
        p = r.params
        if not p.ignore_eos and tok in p.stop_token_ids and len(r.output_ids) >= p.min_new_tokens:
            return "stop"
        if self._length_reached(r, len(r.output_ids)):
            return "length"
        return None

    def _finish(self, r: Request, reason: str) -> None:
        """Retire `r` now: its row goes back, and its KV slots to the prefix cache or the pool."""
        r.finished, r.finish_reason = True, reason
        if r.row >= 0:
            held = self.table.free_row(r.row)
            if self.kv.cache is not None:
                held = self._cache(r, held)
            self.kv.release(held)
            r.row = -1
        if r in self.running:
            self.running.remove(r)
        r.image_embeds = None
        r.grammar = None
        self.requests.pop(r.req_id, None)
