"""The one place where errors become HTTP responses, always in OpenAI's shape."""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from quart import Response
from werkzeug.exceptions import HTTPException

from mesh.errors import BadRequest, MeshError

log = logging.getLogger("api.errors")

_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


def error_response(exc: MeshError) -> Response:
    return json_response(exc.to_openai(), status=exc.status)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj), status=status, mimetype="application/json",
                    headers=headers or {})


def from_validation(exc: ValidationError) -> BadRequest:
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
    return BadRequest(msg, param=loc or None, code="invalid_value" if e["type"] != "missing"
                      else "missing_required_parameter")


def from_http(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(status)
    msg = exc.description or exc.name
    if status == 404:
        msg = "Unknown request URL. Please check the URL and method."
    elif status == 413:
        msg = "Request body is larger than this node accepts"
    body = {"error": {"message": msg, "type": _HTTP_TYPES.get(status, "invalid_request_error"
                                                               if status < 500 else "server_error"),
                      "param": None, "code": code}}
    return json_response(body, status=status)


def install(app) -> None:
    """Register handlers: no request ever ends in a traceback or an HTML page."""

    @app.errorhandler(MeshError)
    async def _mesh(exc: MeshError):
        if exc.status >= 500:
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
        return json_response({"error": {"message": f"internal error: {type(exc).__name__}",
                                         "type": "server_error", "param": None,
                                         "code": "internal_error"}}, status=500)
