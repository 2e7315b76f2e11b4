"""OpenAI-compatible routes: /v1/models, chat, completions, embeddings, transcriptions.

Each handler validates its body, asks the router where the model is served, and either
talks to the local worker (formatting OpenAI objects here) or relays a peer's response
through the proxy byte for byte. Errors that happen before the first byte are ordinary
OpenAI-shaped responses; after the first byte of a stream, an `error` event then
`[DONE]` ends it (the status line is already sent).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any, AsyncIterator

import numpy as np
import trio
from quart import Blueprint, Response, current_app, request

from api.errors import json_response
from api.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, TranscriptionForm
from api import transcripts
from mesh.errors import BadRequest, MeshError, ModelNotFound, Timeout, UnsupportedMedia
from node.workers import Worker, check_frame

bp = Blueprint("openai", __name__)


def _services():
    return current_app.config["MESH"]


async def _json_body(model_cls):
    raw = await request.get_data()
    if not raw:
        raise BadRequest("the request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"could not parse the JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("the JSON body must be an object")
    return model_cls.model_validate(data)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    svc = _services()
    return {"x-mesh-node": svc.node_name, **(extra or {})}


def _stream_response(body: AsyncIterator[bytes]) -> Response:
    resp = Response(body, mimetype="text/event-stream",
                    headers=_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}))
    resp.timeout = None
    return resp


def _require_backend(worker: Worker, backend: str, what: str) -> None:
    if worker.spec.backend != backend:
        raise BadRequest(f"model '{worker.id}' ({worker.spec.backend}) does not support {what}",
                         param="model", code="model_not_supported")


async def _route_local(model: str, backend: str, what: str) -> Worker:
    """The local worker for `model`, or a relayed peer response (raised as _Relay)."""
    svc = _services()
    route = svc.router.route(model, proxied=svc.is_proxied(request))
    if route.local is not None:
        _require_backend(route.local, backend, what)
        return route.local
    raise _Relay(await svc.proxy.forward(route, request))


class _Relay(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _relay_aware(handler):
    async def wrapper(*a, **kw):
        try:
            return await handler(*a, **kw)
        except _Relay as relay:
            return relay.response
    wrapper.__name__ = handler.__name__
    return wrapper


def _limit_tokens(n: int | None) -> int | None:
    cap = _services().config.max_tokens_limit
    if cap and n is not None and n > cap:
        raise BadRequest(f"max_tokens is {n}, above this mesh's limit of {cap}",
                         param="max_tokens", code="invalid_value")
    return cap if (cap and n is None) else n


# ------------------------------------------------------------------ models
@bp.get("/v1/models")
async def list_models():
    return json_response({"object": "list", "data": _services().router.model_cards()},
                         headers=_headers())


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str):
    for card in _services().router.model_cards():
        if card["id"] == model_id:
            return json_response(card, headers=_headers())
    raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")


# ------------------------------------------------------- chat / completions
async def _generation(worker: Worker, payload: dict[str, Any]):
    """Open a generation; return (first frame, frames iterator, closer). Errors the worker
    reports before any token raise here, so they become normal 4xx/5xx responses."""
    cm = worker.request("generate", request=payload)
    frames = await cm.__aenter__()
    try:
        with trio.fail_after(_services().config.request_timeout):
            first = await frames.__anext__()
        check_frame(first, worker.id)
    except trio.TooSlowError:
        await cm.__aexit__(None, None, None)
        raise Timeout(f"no token from {worker.id!r} within the request deadline")
    except BaseException as exc:
        await cm.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    return first, frames, cm


async def _generate_stream(worker, payload, make_chunk, first_chunk, include_usage):
    first, frames, cm = await _generation(worker, payload)

    async def body():
        exc_info = (None, None, None)
        try:
            if first_chunk is not None:
                yield _sse(first_chunk)
            frame = first
            while True:
                kind = frame.get("type")
                if kind == "delta":
                    yield _sse(make_chunk(frame["text"], None))
                elif kind == "done":
                    yield _sse(make_chunk(None, frame.get("finish_reason") or "stop"))
                    if include_usage:
                        yield _sse(make_chunk(None, None, usage=frame.get("usage")))
                    break
                else:
                    check_frame(frame, worker.id)
                try:
                    frame = await frames.__anext__()
                except StopAsyncIteration:
                    raise MeshError(f"the stream from {worker.id!r} ended early")
        except MeshError as exc:
            yield _sse(exc.to_openai())
        except BaseException as exc:
            exc_info = (type(exc), exc, exc.__traceback__)
            raise
        finally:
            with trio.CancelScope(shield=True):
                await cm.__aexit__(*exc_info)
        yield b"data: [DONE]\n\n"

    return _stream_response(body())


async def _generate_full(worker, payload):
    first, frames, cm = await _generation(worker, payload)
    text: list[str] = []
    try:
        frame = first
        while True:
            check_frame(frame, worker.id)
            if frame["type"] == "delta":
                text.append(frame["text"])
            elif frame["type"] == "done":
                return "".join(text), frame.get("finish_reason") or "stop", frame.get("usage")
            frame = await frames.__anext__()
    finally:
        with trio.CancelScope(shield=True):
            await cm.__aexit__(None, None, None)


@bp.post("/v1/chat/completions")
@_relay_aware
async def chat_completions():
    req = await _json_body(ChatRequest)
    worker = await _route_local(req.model, "llama", "chat completions")
    try:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    except ValueError as exc:
        raise BadRequest(str(exc), param="messages") from exc
    payload = {"kind": "chat", "messages": messages, "max_tokens": _limit_tokens(req.limit()),
               "stop": req.stop, **req.sampling()}
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model
    if req.stream:
        def chunk(text, finish, usage=None):
            base = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "system_fingerprint": None}
            if usage is not None:
                return {**base, "choices": [], "usage": usage}
            delta = {"content": text} if text is not None else {}
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]}
        first = {"id": cid, "object": "chat.completion.chunk", "created": created,
                 "model": model, "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]}
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await _generate_stream(worker, payload, chunk, first, include)
    text, finish, usage = await _generate_full(worker, payload)
    return json_response({
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": finish}],
        "usage": usage}, headers=_headers())


@bp.post("/v1/completions")
@_relay_aware
async def completions():
    req = await _json_body(CompletionRequest)
    worker = await _route_local(req.model, "llama", "completions")
    payload = {"kind": "completion", "prompt": req.prompt,
               "max_tokens": _limit_tokens(req.limit()), "stop": req.stop, **req.sampling()}
    cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model
    echo = req.prompt if req.echo else ""
    if req.stream:
        def chunk(text, finish, usage=None):
            base = {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "system_fingerprint": None}
            if usage is not None:
                return {**base, "choices": [], "usage": usage}
            return {**base, "choices": [{"text": text or "", "index": 0, "logprobs": None,
                                         "finish_reason": finish}]}
        include = bool(req.stream_options and req.stream_options.include_usage)
        first = chunk(echo, None) if echo else None
        return await _generate_stream(worker, payload, chunk, first, include)
    text, finish, usage = await _generate_full(worker, payload)
    return json_response({
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{"text": echo + text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "usage": usage}, headers=_headers())


# -------------------------------------------------------------- embeddings
@bp.post("/v1/embeddings")
@_relay_aware
async def embeddings():
    req = await _json_body(EmbeddingRequest)
    worker = await _route_local(req.model, "llama", "embeddings")
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    result = await worker.call("embed", input=inputs)
    vectors = result["data"]
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
    n = int(result.get("prompt_tokens") or 0)
    return json_response({"object": "list", "data": data, "model": req.model,
                          "usage": {"prompt_tokens": n, "total_tokens": n}}, headers=_headers())


# ----------------------------------------------------------- transcription
async def _multipart():
    """Parse the multipart body from the raw bytes, which stay readable by the proxy
    (Quart's own `request.form` consumes the body)."""
    raw = await request.get_data()

    async def once():
        yield raw

    parser = request.make_form_data_parser()
    return await parser.parse(once(), request.mimetype, len(raw), request.mimetype_params)


@bp.post("/v1/audio/transcriptions")
@_relay_aware
async def transcriptions():
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise BadRequest("expected a multipart/form-data body with a 'file' field",
                         param="file")
    form, files = await _multipart()
    params = TranscriptionForm.model_validate(dict(form.items()))
    worker = await _route_local(params.model, "whisper", "audio transcription")
    upload = files.get("file")
    if upload is None:
        raise BadRequest("you must provide 'file'", param="file",
                         code="missing_required_parameter")
    audio = upload.read()
    if not audio:
        raise UnsupportedMedia("the uploaded file is empty", param="file")
    result = await worker.call("transcribe", audio=audio, params={
        "language": params.language, "prompt": params.prompt, "temperature": params.temperature})
    body, mimetype = transcripts.render(result, params.response_format)
    return Response(body, mimetype=mimetype, headers=_headers())
