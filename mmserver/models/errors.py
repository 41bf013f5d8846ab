"""Errors of the model layer that callers map to a reason: a checkpoint we cannot serve
(start-up fails), or a client's input the model cannot take (a 400)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A checkpoint whose config we cannot (or must not) serve."""


class PromptError(ValueError):
    """A prompt that does not fit its images (or otherwise cannot be built)."""


class OptionError(ValueError):
    """A bad image option: `name` is the option as the client spelled it, `detail` says what
    is wrong ("must be …"); the caller words the message for its own API."""

    def __init__(self, name: str, detail: str):
        super().__init__(name, detail)  # both in args: the exception pickles and unpickles
        self.name, self.detail = name, detail

    def __str__(self) -> str:
        return f"{self.name} {self.detail}"


class ImageError(ValueError):
    """An input image cannot be used (unreadable, truncated, empty, too large, wrong type).

    A ValueError subclass so request handlers can map it to a client error
    (HTTP 400) instead of a server crash. Reads "image {index}: {detail}"; `detail` alone is
    for callers that name the image themselves (a ViT worker's image may sit at a different
    index in each request waiting for it).
    """

    def __init__(self, index: int, detail: str, kind: str = "image"):
        super().__init__(index, detail, kind)  # all in args: the exception pickles and unpickles
        self.index, self.detail, self.kind = index, detail, kind

    def __str__(self) -> str:
        return f"{self.kind} {self.index}: {self.detail}"


class VideoError(ImageError):
    """An input video cannot be used (not a video, truncated, no frames): reads "video {index}: …"."""

    def __init__(self, index: int, detail: str, kind: str = "video"):
        super().__init__(index, detail, kind)


class MediaTooLarge(ImageError):
    """An image or video over a server cap (frames, pixel budget): the caller's 413."""
