"""Grammar-constrained decoding (structured outputs) with xgrammar.

``spec`` canonicalises the client's constraint, ``grammar`` builds (and validates) it,
``compiler`` compiles it for the model's tokenizer, ``state`` tracks one request's progress and
``mask`` applies the allowed-token masks to the logits. ``mmserver.engine.sampling`` uses them.
"""

from .compiler import StructuredCompiler, tokenizer_info
from .grammar import build_grammar
from .mask import TokenBitmask
from .spec import GrammarSpec, StructuredOutputError, parse_spec
from .state import GrammarState

__all__ = ["GrammarSpec", "GrammarState", "StructuredCompiler", "StructuredOutputError", "TokenBitmask",
           "build_grammar", "parse_spec", "tokenizer_info"]
