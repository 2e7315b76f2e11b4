"""The OpenAI dialect: /v1/models, chat, completions, embeddings, transcriptions.

A thin adapter at the HTTP edge. Each handler validates its body (api/schemas.py),
translates it into a typed request (mesh/wire/inference.py), asks the router for a
``Call`` (mesh/router.py: this node's workers or a peer, the adapter does not know which)
and turns the events back into OpenAI objects and SSE chunks. This is the only place
OpenAI's JSON is written, on the node the client talks to.

Errors before the first event are ordinary OpenAI-shaped responses (api/errors.py); after
the first byte of a stream, an ``error`` event then ``[DONE]`` ends it (the status line is
already sent). Fields of OpenAI's request schemas this node cannot honour are refused with
a 400 naming them (api/schemas.py classifies every one), never accepted and ignored.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, AsyncIterator, Callable

import numpy as np
from quart import Blueprint, Response, request

from api import transcripts
from api.body import DONE, TEXT, SseTemplate, json_body, sse, sse_response
from api.common import (check_tool_choice, collect, function_tool, json_constraint,
                        limit_tokens, node_headers, open_call, result, services)
from api.errors import json_response, openai_error
from api.schemas import (CHAT_FIELDS, COMPLETION_FIELDS, NEUTRAL, ChatRequest,
                         CompletionRequest, EmbeddingRequest, TranscriptionForm)
from mesh.errors import BadRequest, ModelNotFound, UnsupportedMedia
from mesh.router import Call
from mesh.wire.inference import (Delta, Done, Embed, Failed, Generate, Message,
                                 Sampling, Tool, ToolCall, Transcribe, Usage,
                                 error_from_failed)
from mesh.wire.inference import ResponseFormat as Constraint

bp = Blueprint("openai", __name__)

def _refuse_unsupported(req, table: dict[str, str]) -> None:
    """A 400 naming the first field of `table`'s refused ones that asks for something."""
    for name in sorted(req.model_fields_set):
        if table.get(name) == "refused" and getattr(req, name) not in NEUTRAL.get(name, (None,)):
            raise BadRequest(f"'{name}' is not supported by this server yet; remove it from "
                             "the request", param=name, code="unsupported_parameter")


def _usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


# ------------------------------------------------------------------ models
def _anthropic_card(card: dict[str, Any]) -> dict[str, Any]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(card.get("created") or 0))
    return {"type": "model", "id": card["id"], "display_name": card["id"],
            "created_at": created}


@bp.get("/v1/models")
async def list_models():
    cards = services().router.model_cards()
    if "anthropic-version" in request.headers:      # the Anthropic SDK's models.list()
        data = [_anthropic_card(c) for c in cards]
        return json_response({"data": data, "has_more": False,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None},
                             headers=node_headers())
    return json_response({"object": "list", "data": cards}, headers=node_headers())


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str):
    for card in services().router.model_cards():
        if card["id"] == model_id:
            if "anthropic-version" in request.headers:
                return json_response(_anthropic_card(card), headers=node_headers())
            return json_response(card, headers=node_headers())
    raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")


# ------------------------------------------------------- chat / completions
Chunk = Callable[..., dict[str, Any]]


def _stream(call: Call, chunk: Chunk, first: list[dict[str, Any]], include_usage: bool,
            n: int = 1) -> Response:
    """SSE chunks from the call's events. With n > 1 each choice ends with its own
    finish chunk (a Delta holding its finish_reason), and the final Done adds nothing
    but the usage. A plain text chunk of choice 0 (most of a stream) comes from a
    template encoded once (api/body.py SseTemplate)."""
    text_chunk = SseTemplate(chunk(TEXT, None))

    async def body() -> AsyncIterator[bytes]:
        try:
            for c in first:
                yield sse(c)
            async for ev in call.events():
                if type(ev) is Delta and ev.text and not ev.index and not ev.logprobs \
                        and not ev.tool_calls and ev.finish_reason is None:
                    yield text_chunk(ev.text)
                elif isinstance(ev, Delta):
                    if ev.tool_calls:
                        yield sse(chunk(None, None, logprobs=ev.logprobs,
                                        tool_calls=ev.tool_calls, index=ev.index))
                    elif ev.text or ev.logprobs:
                        yield sse(chunk(ev.text, None, logprobs=ev.logprobs, index=ev.index))
                    if ev.finish_reason is not None:
                        yield sse(chunk(None, ev.finish_reason, index=ev.index))
                elif isinstance(ev, Done):
                    if n == 1:
                        yield sse(chunk(None, ev.finish_reason))
                    if include_usage:
                        yield sse(chunk(None, None, usage=_usage(ev.usage)))
                elif isinstance(ev, Failed):
                    yield sse(openai_error(error_from_failed(ev)))
            yield DONE
        finally:
            await call.aclose()

    return sse_response(body(), headers=node_headers(call))


def _sampling(req) -> Sampling:
    return Sampling(**req.sampling())


def _constraint(rf) -> Constraint | None:
    """`response_format` as the worker's constraint."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object" and rf.schema_ is None:
        return json_constraint(None)
    inner = rf.json_schema.schema_ if rf.json_schema is not None else rf.schema_
    return json_constraint(inner if inner is not None else {})


def _tools(req) -> tuple[tuple[Tool, ...], str]:
    """`tools` and `tool_choice` as the worker's: which functions, and which is forced."""
    tools = []
    for i, t in enumerate(req.tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                             param=f"tools[{i}]")
        tools.append(function_tool(fn.get("name"), fn.get("description"), fn.get("parameters"),
                                   f"tools[{i}].function"))
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequest("tool_choice must be none, auto, required or "
                             "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
        choice = name
    return tuple(tools), check_tool_choice(choice, tuple(tools))


def _tool_call(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": c.arguments}}


def _chat_logprobs(lps) -> dict[str, Any]:
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
                         "top_logprobs": [{"token": x.token, "logprob": x.logprob,
                                           "bytes": list(x.bytes)} for x in t.top]}
                        for t in lps], "refusal": None}


def _completion_logprobs(lps, offset: int) -> dict[str, Any]:
    """The legacy completions shape; text_offset counts from `offset` characters."""
    offsets = []
    for t in lps:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{x.token: x.logprob for x in t.top} for t in lps],
            "text_offset": offsets}


@bp.post("/v1/chat/completions")
async def chat_completions():
    return await run_chat(await json_body(ChatRequest))


async def run_chat(req: ChatRequest) -> Response:
    """A validated chat request, answered (streamed or not); also a batch line's path."""
    _refuse_unsupported(req, CHAT_FIELDS)
    try:
        messages = tuple(Message(role=m.role, content=m.text(), name=m.name,
                                 tool_call_id=m.tool_call_id, tool_calls=tuple(
                                     ToolCall(id=c["id"], name=c["function"]["name"],
                                              arguments=c["function"].get("arguments", ""))
                                     for c in m.tool_calls or ()))
                         for m in req.messages)
    except ValueError as exc:
        raise BadRequest(str(exc), param="messages") from exc
    tools, choice = _tools(req)
    gen = Generate(model=req.model, messages=messages, max_tokens=limit_tokens(req.limit()),
                   stop=tuple(req.stop or ()), sampling=_sampling(req),
                   response_format=_constraint(req.response_format), logprobs=req.n_logprobs(),
                   logit_bias=req.bias(), tools=tools, tool_choice=choice,
                   parallel_tool_calls=req.parallel_tool_calls is not False, n=req.n,
                   stream=bool(req.stream))
    want_lp = gen.logprobs is not None
    call = await open_call(gen)
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    if req.stream:
        def chunk(text, finish, usage=None, logprobs=(), tool_calls=(), index=0):
            if usage is not None:
                return {**base, "choices": [], "usage": usage}
            delta = {"content": text} if text is not None else {}
            if tool_calls:
                delta = {"tool_calls": [{"index": i, **_tool_call(c)}
                                        for i, c in enumerate(tool_calls)]}
            lp = _chat_logprobs(logprobs) if want_lp and logprobs else None
            return {**base, "choices": [{"index": index, "delta": delta, "logprobs": lp,
                                         "finish_reason": finish}]}
        first = [{**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]}
                 for i in range(req.n)]
        include = bool(req.stream_options and req.stream_options.include_usage)
        return _stream(call, chunk, first, include, req.n)
    got = await collect(call, req.n)
    choices = []
    for i, c in enumerate(got.choices):
        message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
        if c.tool_calls:
            message = {**message, "content": c.text or None,
                       "tool_calls": [_tool_call(t) for t in c.tool_calls]}
        choices.append({"index": i, "message": message,
                        "logprobs": _chat_logprobs(c.logprobs) if want_lp else None,
                        "finish_reason": c.finish_reason or got.finish_reason})
    return json_response({
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": choices, "usage": _usage(got.usage)}, headers=node_headers(call))


@bp.post("/v1/completions")
async def completions():
    return await run_completion(await json_body(CompletionRequest))


async def run_completion(req: CompletionRequest) -> Response:
    _refuse_unsupported(req, COMPLETION_FIELDS)
    gen = Generate(model=req.model, prompt=req.prompt, max_tokens=limit_tokens(req.limit()),
                   stop=tuple(req.stop or ()), sampling=_sampling(req), logprobs=req.logprobs,
                   logit_bias=req.bias(), n=req.n, stream=bool(req.stream))
    want_lp = gen.logprobs is not None
    call = await open_call(gen)
    cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model
    echo = req.prompt if req.echo else ""
    base = {"id": cid, "object": "text_completion", "created": created, "model": model}
    offsets = [len(echo)] * req.n
    if req.stream:
        def chunk(text, finish, usage=None, logprobs=(), index=0):
            if usage is not None:
                return {**base, "choices": [], "usage": usage}
            lp = None
            if want_lp and logprobs:
                lp = _completion_logprobs(logprobs, offsets[index])
                offsets[index] += sum(len(t.token) for t in logprobs)
            return {**base, "choices": [{"text": text or "", "index": index, "logprobs": lp,
                                         "finish_reason": finish}]}
        include = bool(req.stream_options and req.stream_options.include_usage)
        first = [chunk(echo, None, index=i) for i in range(req.n)] if echo else []
        return _stream(call, chunk, first, include, req.n)
    got = await collect(call, req.n)
    return json_response({
        **base, "choices": [{"text": echo + c.text, "index": i,
                             "logprobs": (_completion_logprobs(c.logprobs, len(echo))
                                          if want_lp else None),
                             "finish_reason": c.finish_reason or got.finish_reason}
                            for i, c in enumerate(got.choices)],
        "usage": _usage(got.usage)}, headers=node_headers(call))


# ---------------------------------------------------- one-result requests
@bp.post("/v1/embeddings")
async def embeddings():
    return await run_embedding(await json_body(EmbeddingRequest))


async def run_embedding(req: EmbeddingRequest) -> Response:
    inputs = (req.input,) if isinstance(req.input, str) else tuple(req.input)
    res, call = await result(Embed(model=req.model, inputs=inputs))
    vectors = res["data"]
    if req.dimensions is not None:
        if not 1 <= req.dimensions <= len(vectors[0]):
            raise BadRequest(f"dimensions must be between 1 and {len(vectors[0])}",
                             param="dimensions")
        cut = np.asarray(vectors, dtype=np.float32)[:, : req.dimensions]
        cut /= np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
        vectors = cut.tolist()
    data = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if req.encoding_format == "base64":
            emb = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = int(res.get("prompt_tokens") or 0)
    return json_response({"object": "list", "data": data, "model": req.model,
                          "usage": {"prompt_tokens": n, "total_tokens": n}},
                         headers=node_headers(call))


async def _multipart():
    raw = await request.get_data()

    async def once():
        yield raw

    parser = request.make_form_data_parser()
    return await parser.parse(once(), request.mimetype, len(raw), request.mimetype_params)


@bp.post("/v1/audio/transcriptions")
async def transcriptions():
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise BadRequest("expected a multipart/form-data body with a 'file' field",
                         param="file")
    form, files = await _multipart()
    params = TranscriptionForm.model_validate(dict(form.items()))
    upload = files.get("file")
    if upload is None:
        raise BadRequest("you must provide 'file'", param="file",
                         code="missing_required_parameter")
    audio = upload.read()
    if not audio:
        raise UnsupportedMedia("the uploaded file is empty", param="file")
    res, call = await result(Transcribe(
        model=params.model, audio=audio, language=params.language, prompt=params.prompt,
        temperature=params.temperature))
    body, mimetype = transcripts.render(res, params.response_format)
    return Response(body, mimetype=mimetype, headers=node_headers(call))
