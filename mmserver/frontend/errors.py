"""Errors that become HTTP responses: a status and a message naming what is wrong."""

from __future__ import annotations


class HTTPError(Exception):
    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(HTTPError):
    status = 400


class BadParam(BadRequest):
    """A bad request field; `param` names it (OpenAI errors report it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class TooLarge(HTTPError):
    status = 413


class Overloaded(HTTPError):
    status = 503


class Unavailable(HTTPError):
    status = 503
