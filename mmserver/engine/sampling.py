"""Sampling parameters and the batched token sampler.

Semantics (applied in this order, per row of the ``[B, V]`` logits):

1. **repetition_penalty** (HF / vLLM): for every token id that appears in the
   prompt *or* the output so far, ``logit = logit / p if logit > 0 else logit * p``.
   Each id is penalised once, however often it occurs.
2. **presence_penalty / frequency_penalty** (OpenAI / vLLM), output tokens only:
   ``logit -= presence * [count > 0] + frequency * count``.
3. **grammar** (rows given a ``GrammarState``, see below): every token the
   grammar does not allow next gets ``-inf``.
4. **min_new_tokens**: while ``len(output) < min_new_tokens`` the
   ``stop_token_ids`` get ``-inf`` so the model cannot end early. With
   ``ignore_eos`` they are never masked (``ignore_eos`` only means the engine does
   not stop on them). On a grammar row where that would leave no token at all
   (the grammar allows only a stop token), the grammar wins and the stop mask is
   undone for that row.
5. **greedy rows** (``SamplingParams.is_greedy``): ``argmax`` of the penalised
   logits (``torch.argmax``: ties go to the lowest id).
6. **sampling rows**: ``logits / temperature``, then top-k (keep the k largest;
   ``top_k`` of -1 or 0 is off), then top-p (keep the smallest prefix of the
   sorted distribution whose cumulative probability is ``>= top_p``, always at
   least the top token), then one draw from the softmax using the
   exponential-race trick ``argmax(probs / Exponential(1))``. The exponential
   noise is drawn per row from that row's ``torch.Generator`` (or the global RNG
   when it has none), so a seeded request gets the same tokens whatever else is
   in the batch.

The returned log-probability is that of the chosen token under the model's
*raw* distribution, ``log_softmax`` of the unmodified logits (vLLM's default
"raw logprobs"), so penalties, grammar masks, temperature and truncation do
not change it.

**top_logprobs** (``SamplingParams.top_logprobs``, 0-20 as in OpenAI's API): the
row's K most likely tokens under that same raw ``log_softmax``, sorted by
descending logprob (equal logits: lower id first), returned by ``Sampler.sample``
as ``top_ids``/``top_logprobs`` of shape ``[B, K]`` with K the largest request in
the batch. Row ``i`` owns its first ``params[i].top_logprobs`` columns; the rest
are padding (id -1, logprob -inf). They are the model's alternatives, not the
sampler's: a greedy row with nothing that changes its logits (no penalty,
grammar or stop mask) has its chosen token first, with exactly the chosen
token's logprob. Nothing is computed when no row asks.

**Grammars** (structured outputs, ``mmserver.structured``): ``grammars[i]`` is
row ``i``'s ``GrammarState`` or None. The sampler only *reads* a state (fills its
mask); it never advances it. The caller accepts each sampled token into its
row's state (``state.accept(token)``, in order, once the token is on the host)
before sampling that row again, and finishes the request once
``state.is_terminated()`` (it accepted a stop token). Hence a row with a grammar
needs its previous token on the host before it is sampled, like a penalised row:
``SamplingParams.needs_host_tokens``. Rows without a grammar pay nothing, and a
batch without any never touches xgrammar.

A batch that is all greedy with neutral penalties and nothing to mask takes a
fast path: one ``argmax`` and one ``log_softmax`` gather. Penalties work on the
penalised rows only; pass ``prompt_ids`` as tensors already on the logits'
device where possible (long Python lists cost a host conversion every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # xgrammar is imported only by batches that have a grammar
    from mmserver.structured import GrammarState, TokenBitmask

__all__ = ["SamplingParams", "SampleResult", "Sampler", "make_generator", "MAX_TOP_LOGPROBS"]

_MAX_STOP_SEQUENCES = 16
_MAX_SEED = 2**63
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    min_new_tokens: int = 1
    stop_sequences: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # EOS ids, set by the engine
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, 0-20
    # A constraint spec (OpenAI response_format or vLLM structured_outputs, see
    # mmserver.structured.spec); None: unconstrained.
    structured: dict[str, Any] | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field and its allowed range.

        An invalid ``structured`` spec raises ``mmserver.structured.StructuredOutputError`` (a
        ``ValueError``) saying what is wrong with the schema, regex or grammar."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            _bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if not _is_number(self.temperature) or not self.temperature >= 0:
            _bad("temperature", self.temperature, "a number >= 0 (0 means greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _bad("top_p", self.top_p, "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            _bad("top_k", self.top_k, "-1 (off) or an integer >= 0 (0 also means off)")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            _bad("repetition_penalty", self.repetition_penalty, "a number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                _bad(name, value, "a number in [-2, 2]")
        if not _is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            _bad("min_new_tokens", self.min_new_tokens,
                 f"an integer in [0, max_new_tokens={self.max_new_tokens}]")
        self._validate_stop_sequences()
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED):
            _bad("seed", self.seed, "null or an integer in [0, 2**63)")
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            _bad("stop_token_ids", self.stop_token_ids, "a list of integers >= 0")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            _bad("top_logprobs", self.top_logprobs, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.structured is not None:
            from mmserver.structured import build_grammar, parse_spec

            build_grammar(parse_spec(self.structured))  # cached: the engine's compile reuses it

    def _validate_stop_sequences(self) -> None:
        stops = self.stop_sequences
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            _bad("stop_sequences", stops, "a list of non-empty strings")
        if len(stops) > _MAX_STOP_SEQUENCES:
            _bad("stop_sequences", f"<{len(stops)} strings>",
                 f"at most {_MAX_STOP_SEQUENCES} strings")

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def needs_host_tokens(self) -> bool:
        """The row's previous token must be on the host before it is sampled: penalties count
        the output ids, and a grammar's mask depends on every token accepted so far."""
        return self.has_penalties or self.structured is not None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    # NaN fails every range comparison, so it is rejected by the callers' checks.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``; ``None`` (global RNG) if unseeded."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SampleResult:
    """One step's samples, all on the logits' device."""

    token_ids: Tensor  # [B] int64
    logprobs: Tensor  # [B] float32, raw logprob of each chosen token
    top_ids: Tensor | None = None  # [B, K] int64 (padding -1), None when no row asked
    top_logprobs: Tensor | None = None  # [B, K] float32 (padding -inf)


class Sampler:
    """Batched sampler; see the module docstring for the exact semantics."""

    def __init__(self) -> None:
        self._bitmask: TokenBitmask | None = None  # created by the first batch with a grammar

    def __call__(
        self,
        logits: Tensor,
        params: list[SamplingParams],
        prompt_ids: list[Tensor | list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        num_outputs: list[int] | None = None,
        grammars: Sequence[GrammarState | None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(token_ids [B] int64, raw logprob of each chosen token [B] float32)``;
        ``sample`` also returns the top_logprobs alternatives."""
        result = self.sample(logits, params, prompt_ids, output_ids, generators, num_outputs, grammars)
        return result.token_ids, result.logprobs

    def sample(
        self,
        logits: Tensor,
        params: list[SamplingParams],
        prompt_ids: list[Tensor | list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        num_outputs: list[int] | None = None,
        grammars: Sequence[GrammarState | None] | None = None,
    ) -> SampleResult:
        """Sample one token per row of ``logits [B, V]``.

        ``num_outputs`` counts each row's generated tokens for min_new_tokens when some are
        not in ``output_ids`` yet (the engine's overlap schedule; rows with penalties must
        have them all there). Default: ``len(output_ids[i])``.

        ``grammars``: one ``GrammarState`` or None per row (None for the whole argument: no
        grammars). Each state must already have accepted all of its row's earlier tokens; the
        caller accepts the token returned here (see the module docstring)."""
        batch = logits.shape[0]
        if not len(params) == len(prompt_ids) == len(output_ids) == len(generators) == batch:
            raise ValueError("params, prompt_ids, output_ids and generators need one entry per row")
        if grammars is not None and len(grammars) != batch:
            raise ValueError("grammars needs one entry (a GrammarState or None) per row")
        has_grammar = grammars is not None and any(g is not None for g in grammars)
        logits = logits.float()
        counts = num_outputs if num_outputs is not None else [len(ids) for ids in output_ids]
        min_token_rows = [i for i, p in enumerate(params) if _needs_min_token_mask(p, counts[i])]
        if not min_token_rows and not has_grammar and all(p.is_greedy and not p.has_penalties for p in params):
            tokens = logits.argmax(dim=-1)  # fast path: plain greedy
        else:
            processed = logits.clone()
            _apply_repetition_penalty(processed, params, prompt_ids, output_ids)
            _apply_presence_frequency(processed, params, output_ids)
            if has_grammar:
                self._apply_grammars(processed, grammars, params, min_token_rows)
            else:
                _mask_stop_tokens(processed, params, min_token_rows)
            tokens = processed.argmax(dim=-1)
            sample_rows = [i for i, p in enumerate(params) if not p.is_greedy]
            if sample_rows:
                rows = _on_device(sample_rows, logits.device)
                picked = _sample(processed[rows], [params[i] for i in sample_rows],
                                 [generators[i] for i in sample_rows])
                tokens[rows] = picked

        raw = torch.log_softmax(logits, dim=-1)
        result = SampleResult(tokens, raw.gather(1, tokens.unsqueeze(1)).squeeze(1))
        k = min(max(p.top_logprobs for p in params), logits.shape[1]) if batch else 0
        if k > 0:
            result.top_ids, result.top_logprobs = _top_alternatives(logits, raw, params, k)
        return result

    def _apply_grammars(
        self,
        logits: Tensor,
        grammars: Sequence[GrammarState | None],
        params: list[SamplingParams],
        min_token_rows: list[int],
    ) -> None:
        """Grammar masks, then the min_new_tokens stop mask, which a grammar row loses where
        the two together would leave it no token at all."""
        if self._bitmask is None:
            from mmserver.structured import TokenBitmask

            self._bitmask = TokenBitmask()
        self._bitmask.apply(logits, grammars)
        both = [i for i in min_token_rows if grammars[i] is not None]
        if not both:
            _mask_stop_tokens(logits, params, min_token_rows)
            return
        rows = _on_device(both, logits.device)
        saved = logits[rows]  # a copy: advanced indexing
        _mask_stop_tokens(logits, params, min_token_rows)
        masked = logits[rows]
        dead = torch.isneginf(masked).all(dim=-1, keepdim=True)  # on the device: no sync
        logits[rows] = torch.where(dead, saved, masked)


def _top_alternatives(logits: Tensor, raw: Tensor, params: list[SamplingParams], k: int) -> tuple[Tensor, Tensor]:
    """``[B, k]`` most likely ids and their raw logprobs, best first; equal logits: lower id first
    (as ``argmax``), so a plain greedy row's choice is its first alternative. Ranked by the
    logits rather than ``raw`` so that rounding in ``log_softmax`` cannot reorder them."""
    values, ids = logits.topk(k, dim=-1)
    ids, by_id = ids.sort(dim=-1)
    order = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True).indices
    ids = ids.gather(1, order)
    top = raw.gather(1, ids)
    wanted = [p.top_logprobs for p in params]
    if min(wanted) < k:  # rows that asked for fewer: pad their extra columns
        want = _on_device(wanted, logits.device).unsqueeze(1)
        pad = torch.arange(k, device=logits.device).unsqueeze(0) >= want
        ids = ids.masked_fill(pad, -1)
        top = top.masked_fill(pad, float("-inf"))
    return ids, top


def _on_device(values: Sequence | Tensor, device: torch.device) -> Tensor:
    """Host values as a tensor on `device` without synchronising the stream: a plain host→CUDA
    copy waits for all queued work, which would undo the engine's overlap schedule. Pinned
    memory makes the copy asynchronous (torch keeps the block alive until it has run)."""
    host = values if isinstance(values, Tensor) else torch.tensor(values)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# --- logit processors -------------------------------------------------------
# Each works only on the rows that need it, so a large vocabulary costs [n, V]
# scratch memory for the n penalised rows instead of the whole batch.


def _needs_min_token_mask(p: SamplingParams, num_output: int) -> bool:
    return not p.ignore_eos and bool(p.stop_token_ids) and num_output < p.min_new_tokens


def _token_counts(id_lists: Sequence[Tensor | list[int]], vocab: int, device: torch.device) -> Tensor:
    """``[n, V]`` float count of each id per row, with one ``scatter_add`` on the flat view."""
    counts = torch.zeros(len(id_lists), vocab, device=device)
    index = _flat_index(id_lists, vocab, device)
    if index.numel():
        counts.view(-1).scatter_add_(0, index, torch.ones(index.numel(), device=device))
    return counts


def _flat_index(id_lists: Sequence[Tensor | list[int]], vocab: int, device: torch.device) -> Tensor:
    """``row * V + id`` for every id, as one int64 tensor on ``device``.

    Ids already on ``device`` stay there; host ids are joined first so they
    cost a single host-to-device copy instead of one per row.
    """
    on_device, on_host = [], []
    for row, ids in enumerate(id_lists):
        if isinstance(ids, Tensor) and ids.device == device:
            on_device.append(ids.reshape(-1).long() + row * vocab)
        else:
            on_host.append(torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu() + row * vocab)
    if on_host:
        on_device.append(_on_device(torch.cat(on_host), device))
    return torch.cat(on_device) if on_device else torch.zeros(0, dtype=torch.long, device=device)


def _apply_repetition_penalty(
    logits: Tensor,
    params: list[SamplingParams],
    prompt_ids: list[Tensor | list[int]],
    output_ids: list[list[int]],
) -> None:
    sel = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if not sel:
        return
    device = logits.device
    rows = _on_device(sel, device)
    vocab = logits.shape[1]
    seen = (_token_counts([prompt_ids[i] for i in sel], vocab, device)
            + _token_counts([output_ids[i] for i in sel], vocab, device)) > 0
    penalty = _on_device([params[i].repetition_penalty for i in sel], device).unsqueeze(1)
    sub = logits[rows]
    penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits[rows] = torch.where(seen, penalised, sub)


def _apply_presence_frequency(
    logits: Tensor, params: list[SamplingParams], output_ids: list[list[int]]
) -> None:
    sel = [i for i, p in enumerate(params) if p.presence_penalty != 0 or p.frequency_penalty != 0]
    if not sel:
        return
    device = logits.device
    rows = _on_device(sel, device)
    counts = _token_counts([output_ids[i] for i in sel], logits.shape[1], device)
    presence = _on_device([params[i].presence_penalty for i in sel], device).unsqueeze(1)
    frequency = _on_device([params[i].frequency_penalty for i in sel], device).unsqueeze(1)
    logits[rows] -= presence * (counts > 0).float() + frequency * counts


def _mask_stop_tokens(logits: Tensor, params: list[SamplingParams], rows: list[int]) -> None:
    vocab = logits.shape[1]
    # Ids outside the LM head cannot be produced anyway, so they are skipped.
    pairs = [(i, t) for i in rows for t in params[i].stop_token_ids if 0 <= t < vocab]
    if pairs:
        index = _on_device(pairs, logits.device)
        logits[index[:, 0], index[:, 1]] = float("-inf")


# --- sampling ----------------------------------------------------------------


def _sample(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> Tensor:
    """Draw one token per row from temperature-scaled, top-k/top-p truncated logits."""
    device = logits.device
    temperature = _on_device([p.temperature for p in params], device).unsqueeze(1)
    logits = logits / temperature
    if any(_top_k(p, logits.shape[1]) or p.top_p < 1.0 for p in params):
        logits = _truncate_top_k_top_p(logits, params)
    probs = torch.softmax(logits, dim=-1)
    return _exponential_race(probs, generators)


def _top_k(p: SamplingParams, vocab: int) -> int:
    """The effective k, or 0 when top-k does not cut anything."""
    return p.top_k if 0 < p.top_k < vocab else 0


def _truncate_top_k_top_p(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    vocab = logits.shape[1]
    device = logits.device
    # Stable sort so ties are ordered by id, independent of the batch.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    position = torch.arange(vocab, device=device).unsqueeze(0)

    k = _on_device([_top_k(p, vocab) or vocab for p in params], device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(position >= k, float("-inf"))

    top_p = _on_device([p.top_p for p in params], device).unsqueeze(1)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token once the tokens ranked above it already reach top_p; the top
    # token has nothing above it, so it always survives.
    # Rows with top_p == 1 are exempt: float cumsum can reach 1.0 before the tail.
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_above >= top_p) & (position > 0) & (top_p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))

    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def _exponential_race(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """``argmax(probs / E)`` with ``E ~ Exponential(1)``: a draw from ``probs``.

    The noise for each row comes from that row's own generator, so a seeded row
    does not depend on the batch around it.
    """
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:  # the global RNG promises no reproducibility, so draw these at once
        rows = _on_device(unseeded, probs.device)
        noise[rows] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(1.0)
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i].exponential_(1.0, generator=generator)
    # A zero draw would turn 0/0 into NaN, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)
