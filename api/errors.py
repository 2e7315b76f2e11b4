"""THE table from mesh/errors.py's tree to HTTP, and the one place errors become responses.

Every route, the auth middleware and the streaming adapters render errors through
``status_of`` / ``render`` here; the most specific class in the table wins (walk the
MRO), so a new subclass inherits its parent's row until it needs its own.

Each dialect gets its own error body, chosen by the request's path (``dialect_of``):
    openai     {"error": {"message", "type", "param", "code"}}        everything else
    anthropic  {"type": "error", "error": {"type", "message"}}        /v1/messages...
    ollama     {"error": "message"}                                   /api/...

    class              status  OpenAI type
    BadRequest          400    invalid_request_error
    PayloadTooLarge     413    invalid_request_error
    AuthError           401    authentication_error
    PermissionDenied    403    permission_error
    NotFound            404    invalid_request_error
    Conflict            409    invalid_request_error
    RateLimited         429    rate_limit_error
    GalleryError        502    server_error
    DiskFull            507    server_error
    BackendError        500    server_error
    Unavailable         503    server_error
    PeerError           502    server_error
    Timeout             504    server_error
    MeshError           500    server_error
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from quart import Response
from werkzeug.exceptions import HTTPException

from mesh import errors as E

log = logging.getLogger("api.errors")

TABLE: dict[type[E.MeshError], tuple[int, str]] = {
    E.BadRequest: (400, "invalid_request_error"),
    E.PayloadTooLarge: (413, "invalid_request_error"),
    E.AuthError: (401, "authentication_error"),
    E.PermissionDenied: (403, "permission_error"),
    E.NotFound: (404, "invalid_request_error"),
    E.Conflict: (409, "invalid_request_error"),
    E.RateLimited: (429, "rate_limit_error"),
    E.GalleryError: (502, "server_error"),
    E.DiskFull: (507, "server_error"),
    E.BackendError: (500, "server_error"),
    E.Unavailable: (503, "server_error"),
    E.PeerError: (502, "server_error"),
    E.Timeout: (504, "server_error"),
    E.MeshError: (500, "server_error"),
}


def _row(exc: E.MeshError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in TABLE:
            return TABLE[cls]
    return TABLE[E.MeshError]


def status_of(exc: E.MeshError) -> int:
    return _row(exc)[0]


def openai_error(exc: E.MeshError) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    err = {"message": exc.message, "type": _row(exc)[1], "param": exc.param, "code": exc.code}
    err.update(exc.extra)
    return {"error": err}


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC = {400: "invalid_request_error", 401: "authentication_error",
              403: "permission_error", 404: "not_found_error", 413: "request_too_large",
              429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def anthropic_error(exc: E.MeshError) -> dict[str, Any]:
    kind = _ANTHROPIC.get(status_of(exc), "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def ollama_error(exc: E.MeshError) -> dict[str, Any]:
    return {"error": exc.message}


RENDER = {"openai": openai_error, "anthropic": anthropic_error, "ollama": ollama_error}


def dialect_of(path: str) -> str:
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    return "openai"


def render(exc: E.MeshError, dialect: str = "openai") -> dict[str, Any]:
    """The error body in `dialect`'s shape (the status is ``status_of(exc)``)."""
    return RENDER[dialect](exc)


RETRY_AFTER_S = 5    # the Retry-After of a 503: the node is busy or restarting a model


def error_response(exc: E.MeshError) -> Response:
    from quart import request
    status = status_of(exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return json_response(render(exc, dialect_of(request.path)), status=status, headers=headers)


def asgi_error(exc: E.MeshError, path: str = "/") -> tuple[int, bytes]:
    """(status, JSON body) for ASGI middleware that answers before the app."""
    return status_of(exc), json.dumps(render(exc, dialect_of(path))).encode()


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj), status=status, mimetype="application/json",
                    headers=headers or {})


def from_validation(exc: ValidationError) -> E.BadRequest:
    """pydantic's first complaint as one OpenAI-style 400."""
    e = exc.errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if x != "body")
    msg = e["msg"]
    if e["type"] == "missing":
        msg = f"you must provide '{loc}'"
    elif e["type"] == "extra_forbidden":
        msg = f"unrecognized request argument supplied: {loc}"
    else:
        msg = f"invalid value for '{loc}': {msg}"
    return E.BadRequest(msg, param=loc or None, code="invalid_value" if e["type"] != "missing"
                        else "missing_required_parameter")


_HTTP = {400: E.BadRequest, 401: E.AuthError, 403: E.PermissionDenied, 404: E.NotFound,
         405: E.BadRequest, 409: E.Conflict, 413: E.PayloadTooLarge, 429: E.RateLimited}


def from_http(exc: HTTPException) -> Response:
    """Quart/werkzeug's own errors (unknown route, 405, 413) in the same shape."""
    from quart import request
    status = exc.code or 500
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(status)
    msg = exc.description or exc.name
    if status == 404:
        msg = "Unknown request URL. Please check the URL and method."
    elif status == 413:
        msg = "Request body is larger than this node accepts"
    err = _HTTP.get(status, E.MeshError)(msg, code=code)
    return json_response(render(err, dialect_of(request.path)), status=status)


def install(app) -> None:
    """Register handlers: no request ever ends in a traceback or an HTML page."""

    @app.errorhandler(E.MeshError)
    async def _mesh(exc: E.MeshError):
        if status_of(exc) >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return error_response(exc)

    @app.errorhandler(ValidationError)
    async def _validation(exc: ValidationError):
        return error_response(from_validation(exc))

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException):
        return from_http(exc)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(E.MeshError(f"internal error: {type(exc).__name__}"))
