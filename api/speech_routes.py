"""OpenAI's text to speech, `POST /v1/audio/speech`, served by a Piper voice anywhere in
the mesh (mesh/wire/inference.py Speak; node/backends/piper.py; docs/speech.md).

Every field of OpenAI's CreateSpeechRequest:
    model            honoured: a piper model of the mesh (alias tts-1); another backend's
                     model is a 400, an unknown one a 404
    input            honoured (1-4096 characters)
    voice            honoured: a name, or {"id": name}; OpenAI's built-in names read with the
                     model's default voice; an unknown one is a 400 naming `voice`
    response_format  honoured: mp3 (default), opus, aac, flac, wav, pcm, each where the
                     serving node has its encoder (else a 400 naming `response_format`)
    speed            honoured (0.25-4): Piper's length_scale
    stream_format    honoured: `audio` (default) sends the encoded bytes, chunked, as each
                     sentence is synthesized; `sse` sends `speech.audio.delta` events
                     (base64 pieces) and one `speech.audio.done` with usage
    instructions     refused: a Piper voice takes no instructions (a 400 naming it)
Any other field is a 400 "unrecognized request argument", as OpenAI answers.

Errors before the first piece are ordinary OpenAI-shaped responses. After it the status
line is gone: an SSE stream ends with an `error` event; a raw audio body is cut without
its final chunk, so the client sees a broken transfer, never a complete-looking file.
"""

from __future__ import annotations

import base64
from typing import Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response

from api.body import json_body, sse, sse_response
from api.common import node_headers, open_call
from api.errors import openai_error
from mesh.errors import BadRequest
from mesh.router import Call
from mesh.wire.inference import Audio, Done, Failed, Speak, error_from_failed

bp = Blueprint("speech", __name__)

MIMETYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
             "wav": "audio/wav", "pcm": "audio/pcm"}


class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechRequest(BaseModel):
    """OpenAI's CreateSpeechRequest (module note: what each field does here)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    input: str = Field(min_length=1, max_length=4096)
    voice: str | VoiceRef
    instructions: str | None = Field(None, max_length=4096)
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"


class SpeechFailed(Exception):
    """A raw audio stream failed after its first byte: the body must end broken."""


def _audio(call: Call) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for ev in call.events():
                if isinstance(ev, Audio):
                    yield ev.data
                elif isinstance(ev, Failed):     # Hypercorn logs it and cuts the body
                    raise SpeechFailed(ev.message)
        finally:
            await call.aclose()
    return body()


def _sse(call: Call) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for ev in call.events():
                if isinstance(ev, Audio):
                    yield sse({"type": "speech.audio.delta",
                               "audio": base64.b64encode(ev.data).decode()})
                elif isinstance(ev, Done):
                    u = ev.usage
                    yield sse({"type": "speech.audio.done", "usage": {
                        "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                        "total_tokens": u.total_tokens}})
                elif isinstance(ev, Failed):
                    yield sse({"type": "error", **openai_error(error_from_failed(ev))})
        finally:
            await call.aclose()
    return body()


@bp.post("/v1/audio/speech")
async def speech():
    req = await json_body(SpeechRequest)
    if req.instructions:
        raise BadRequest("'instructions' is not supported by this server: a Piper voice "
                         "takes no instructions; remove it from the request",
                         param="instructions", code="unsupported_parameter")
    if not req.input.strip():
        raise BadRequest("input has nothing to read aloud", param="input", code="invalid_value")
    voice = req.voice.id if isinstance(req.voice, VoiceRef) else req.voice
    call = await open_call(Speak(model=req.model, input=req.input, voice=voice,
                                 speed=req.speed, format=req.response_format))
    headers: dict[str, Any] = node_headers(call)
    if req.stream_format == "sse":
        return sse_response(_sse(call), headers=headers)
    resp = Response(_audio(call), mimetype=MIMETYPES[req.response_format],
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    resp.timeout = None
    return resp
