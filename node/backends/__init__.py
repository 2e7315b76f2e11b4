"""Backends run inside worker processes; each turns one typed request into events."""

from __future__ import annotations


from mesh.errors import BadRequest


class RequestError(BadRequest):
    """A request the backend refuses before any event (a BadRequest of the one tree)."""

    def __init__(self, message: str, *, code: str = "invalid_request",
                 param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)
