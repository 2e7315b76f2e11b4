"""Backends run inside worker processes; each turns one request into frames."""

from __future__ import annotations


class RequestError(Exception):
    """A request the backend refuses; carries the HTTP status and OpenAI error code."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param
