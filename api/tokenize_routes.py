"""llama-server's `/tokenize` and `/detokenize`, for any model of the mesh.

    POST /tokenize    {"model", "content" | "messages", "add_special"?, "with_pieces"?}
                      -> {"tokens": [id, ...]} or, with_pieces, {"tokens": [{"id", "piece"}]}
    POST /detokenize  {"model", "tokens": [id, ...]} -> {"content": str}

llama-server serves one model, so its clients send no `model`; a mesh serves many, so
`model` is required unless the mesh serves exactly one. `messages` (an extension, as
llama-server's `/apply-template` + tokenize) renders OpenAI-style messages with the
model's chat template first: the count is what a chat request would use as its prompt.
Served or proxied like any request (mesh/wire/inference.py Tokenize, Detokenize).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint

from api.body import json_body
from api.common import node_headers, result, services
from api.errors import json_response
from api.schemas import ChatMessage
from mesh.errors import BadRequest
from mesh.wire.inference import Detokenize, Message, Tokenize

bp = Blueprint("tokenize", __name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


class TokenizeBody(_Body):
    content: str | None = None
    messages: list[ChatMessage] | None = None
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(_Body):
    tokens: list[int] = Field(default_factory=list)


def _model(name: str | None) -> str:
    if name:
        return name
    cards = services().router.model_cards()
    if len(cards) == 1:
        return cards[0]["id"]
    raise BadRequest("you must provide 'model': this mesh serves "
                     f"{len(cards)} models", param="model", code="missing_required_parameter")


@bp.post("/tokenize")
async def tokenize():
    body = await json_body(TokenizeBody)
    if (body.content is None) == (body.messages is None):
        raise BadRequest("give either 'content' or 'messages'", param="content")
    messages = None
    if body.messages is not None:
        try:
            messages = tuple(Message(role=m.role, content=m.text(), name=m.name)
                             for m in body.messages)
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from exc
    res, call = await result(Tokenize(model=_model(body.model), content=body.content,
                                      messages=messages, add_special=body.add_special,
                                      with_pieces=body.with_pieces))
    tokens: list[Any] = res["tokens"]
    if body.with_pieces:
        tokens = [{"id": t, "piece": p} for t, p in zip(tokens, res["pieces"])]
    return json_response({"tokens": tokens}, headers=node_headers(call))


@bp.post("/detokenize")
async def detokenize():
    body = await json_body(DetokenizeBody)
    res, call = await result(Detokenize(model=_model(body.model), tokens=tuple(body.tokens)))
    return json_response({"content": res["content"]}, headers=node_headers(call))
