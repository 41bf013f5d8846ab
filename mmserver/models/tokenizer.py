"""Loading a checkpoint's tokenizer."""

from __future__ import annotations

import os


def load_tokenizer(model_dir: str | os.PathLike, trust_remote_code: bool = False):
    """The checkpoint's own tokenizer (tokenizer.json, or remote code when allowed).

    transformers reads config.json on the way and warns about a model type it does not know
    (InternVL's original layout says `internvl_chat`); that is expected, so the warning is muted.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(level)
