"""Request bodies and event streams: the one JSON-body parser and the one SSE encoder."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, TypeVar

from pydantic import BaseModel
from quart import Response, request

from mesh.errors import BadRequest

M = TypeVar("M", bound=BaseModel)
DONE = b"data: [DONE]\n\n"


async def json_body(model_cls: type[M], *, example: str = "") -> M:
    """The body as `model_cls`; OpenAI-shaped 400s for an empty, unparsable or non-object body
    (a pydantic ValidationError, raised from here, is turned into one by api/errors.py)."""
    raw = await request.get_data()
    if not raw:
        raise BadRequest("the request body is empty; expected a JSON object" + example)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"could not parse the JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("the JSON body must be an object" + example)
    return model_cls.model_validate(data)


def sse(obj: Any) -> bytes:
    """One server-sent event holding `obj` as compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


TEXT = "\x00mesh-text\x00"          # where SseTemplate puts the text


class SseTemplate:
    """The SSE bytes of a chunk that differs from the next only in one string, encoded
    once: `template(text)` == `sse(obj with TEXT replaced by text)`, byte for byte, at the
    cost of one C string escape instead of a dict and a json.dumps per token (the
    stream's text chunks; anything else goes through `sse`)."""

    def __init__(self, obj: Any) -> None:
        self.head, self.tail = sse(obj).split(_ENCODED_MARK)

    def __call__(self, text: str) -> bytes:
        return self.head + _escape(text).encode() + self.tail


_escape = json.encoder.encode_basestring_ascii     # what json.dumps uses (ensure_ascii)
_ENCODED_MARK = _escape(TEXT).encode()


def sse_response(body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> Response:
    resp = Response(body, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                             **(headers or {})})
    resp.timeout = None
    return resp
