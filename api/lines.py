"""One API request run as a batch line (node/batches.py): the same validation and the
same answer as over HTTP, without streaming, as (status, JSON body) with errors in
OpenAI's shape. Runs in the app's context, as `api.common.ON_BEHALF`'s caller."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from api.errors import from_validation, openai_error, status_of
from api.openai_routes import run_chat, run_completion, run_embedding
from api.responses_routes import ResponsesRequest, run_response
from api.schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from mesh.errors import BadRequest, MeshError

__all__ = ["ENDPOINTS", "answer"]

ENDPOINTS = {"/v1/chat/completions": (ChatRequest, run_chat),
             "/v1/completions": (CompletionRequest, run_completion),
             "/v1/embeddings": (EmbeddingRequest, run_embedding),
             "/v1/responses": (ResponsesRequest, run_response)}


async def answer(endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    model_cls, run = ENDPOINTS[endpoint]
    try:
        req = model_cls.model_validate(body)
        if getattr(req, "stream", False):
            raise BadRequest("streaming is not available in a batch", param="stream")
        resp = await run(req)
    except ValidationError as exc:
        err = from_validation(exc)
        return status_of(err), openai_error(err)
    except MeshError as exc:
        return status_of(exc), openai_error(exc)
    return resp.status_code, json.loads(await resp.get_data())
