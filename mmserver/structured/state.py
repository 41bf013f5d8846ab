"""One request's progress through its grammar: which tokens may come next."""

from __future__ import annotations

import xgrammar as xgr
from torch import Tensor

__all__ = ["GrammarState"]


class GrammarState:
    """A thin wrapper around ``xgrammar.GrammarMatcher`` with the contract the sampler and the
    engine rely on:

    * ``fill_mask(bitmask, row)`` writes the allowed next tokens into ``bitmask[row]`` (a CPU int32
      bitmask from ``xgrammar.allocate_token_bitmask``) without changing the state;
    * ``accept(token_id)`` advances by one sampled token, in order, exactly once per token; it
      returns False (and leaves the state unchanged) for a token the grammar does not allow;
    * ``is_terminated()`` is True once a stop token was accepted: the request is finished.

    After termination the mask allows only the stop tokens and accepting a stop token is a no-op
    returning True, so a request that goes on (``ignore_eos``) stays harmless instead of raising
    in the middle of a batch.
    """

    def __init__(self, compiled: xgr.CompiledGrammar):
        self._matcher = xgr.GrammarMatcher(compiled)
        self._stop_ids = tuple(self._matcher.stop_token_ids)
        self.vocab_size: int = compiled.tokenizer_info.vocab_size

    def fill_mask(self, bitmask: Tensor, row: int) -> bool:
        """Fill ``bitmask[row]``; False means every token is allowed (no need to apply it)."""
        if self._matcher.is_terminated():
            bitmask[row].zero_()
            for t in self._stop_ids:
                bit = t % 32  # int32 words: bit 31 is the sign bit
                bitmask[row, t // 32] |= (1 << bit) if bit < 31 else -(1 << 31)
            return True
        return self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        if self._matcher.is_terminated():
            return token_id in self._stop_ids
        return self._matcher.accept_token(int(token_id))

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def is_completed(self) -> bool:
        """The output so far is a complete match (a stop token would be allowed now)."""
        return self._matcher.is_completed()
