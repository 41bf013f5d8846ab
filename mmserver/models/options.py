"""Small checks every model family uses on its environment variables and request options."""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError


def env_positive_int(name: str) -> int | None:
    """An environment variable the family reads when it is built: None when unset or empty."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < 1:
        raise ConfigError(f"environment variable {name}={value} must be >= 1")
    return value


def is_int(v: Any) -> bool:
    """A JSON integer (bool is an int to Python, not to a client)."""
    return isinstance(v, int) and not isinstance(v, bool)
