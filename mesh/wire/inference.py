"""The inference vocabulary: what one request is, and what comes back, everywhere.

Requests and events are frozen, strict pydantic models in tagged unions (field ``kind``).
The same objects travel from the HTTP edge (api/, which translates a dialect's JSON into
a request and events back into the dialect's chunks) through the router
(mesh/router.py) to a local worker process (node/workers.py, msgpack frames) or to a
peer (mesh/proxy.py, `/mesh/openai/2`) and back. Nothing below the API formats OpenAI
objects or SSE.

    Request  = Generate | Embed | Transcribe | Tokenize | Detokenize | Speak
    Event    = Delta | Audio | Done | Result | Failed | Heartbeat

A generation streams ``Delta`` (text) events and ends with one ``Done`` (finish reason,
usage); speech streams ``Audio`` (encoded bytes, in order) and ends with ``Done``;
embeddings and transcriptions end with one ``Result``; any request may end with
``Failed`` (a typed error: the class name of mesh/errors.py's tree, message, param,
code). ``Heartbeat`` is only ever sent by a serving peer to say "still working"
(mesh/proxy.py); the router never passes it on.

Versioning: ``VERSION`` is the vocabulary's major version, carried in every frame that
holds a request (``{"v": VERSION, "request": ...}``); a receiver refuses a major it does
not know. Minor additions are new optional fields with defaults (unknown fields are
ignored), so an older node reads a newer node's request as long as it does not need the
new field. Fields whose meaning a node cannot honour must not be added as optional
"hints": the API refuses what it cannot do (issue: no parameter silently ignored).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from mesh import errors

__all__ = ["VERSION", "Sampling", "ToolCall", "Tool", "Message", "ResponseFormat", "TopLogprob", "TokenLogprob",
           "Generate", "Embed", "Transcribe", "Tokenize", "Detokenize", "Speak", "Request",
           "Usage", "Delta", "Audio", "Done", "Result", "Failed", "Heartbeat", "Event",
           "encode_request", "decode_request", "encode_event", "decode_event",
           "failed_from_error", "error_from_failed", "feature_of", "capabilities_of", "TERMINAL",
           "merged"]

VERSION = 2       # matches the proxy protocol's version: /mesh/openai/2


class _Wire(BaseModel):
    # strict: no silent coercion; an int is accepted where a float is expected (msgpack).
    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")


# ------------------------------------------------------------------ requests
class Sampling(_Wire):
    """Sampler settings; None means the model's default (its model.yaml, then llama.cpp's)."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0)

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ToolCall(_Wire):
    """A function call the model made: `arguments` is a JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


class Tool(_Wire):
    """A function the model may call; `parameters` is a JSON schema (mesh/wire/schema.py)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class Message(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = Field((), strict=False)   # assistant turns
    tool_call_id: str | None = None                              # tool results


class ResponseFormat(_Wire):
    """Constrained output: any JSON object, or JSON valid against ``json_schema`` (the
    subset mesh/wire/schema.py lists; the worker compiles it into a grammar)."""

    type: Literal["json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class Generate(_Wire):
    """A chat turn (``messages``) or a raw completion (``prompt``): exactly one of them.

    ``logprobs``: None for none, else the number (0-20) of most likely alternatives to
    report with each generated token's own log probability."""

    kind: Literal["generate"] = "generate"
    model: str
    messages: tuple[Message, ...] | None = Field(None, strict=False)   # msgpack sends lists
    prompt: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: tuple[str, ...] = Field((), strict=False)
    sampling: Sampling = Field(default_factory=Sampling)
    response_format: ResponseFormat | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: tuple[Annotated[tuple[int, float], Field(strict=False)], ...] = Field(
        (), strict=False)                    # (token id, bias -100..100) pairs
    tools: tuple[Tool, ...] = Field((), strict=False)
    # "required": some tool call is forced; a tool's name: that one is; "none": no tools
    tool_choice: str = "none"
    parallel_tool_calls: bool = True
    # n > 1: that many choices from one prompt (its KV computed once, copied to each
    # choice's sequence); choice i samples with seed + i. Each choice's Deltas carry its
    # ``index``; a choice ends with a Delta holding its ``finish_reason``, and one Done
    # (usage over all choices) ends the stream.
    n: int = Field(1, ge=1, le=16)
    # bulk work (a batch line): the worker admits interactive requests first, and never
    # gives background work a model's last free slot (node/backends/batching.py)
    background: bool = False
    # False: the caller wants the whole answer only (a non-streaming request, a batch
    # line): the worker sends the text once, at the end (tool calls as their own
    # Deltas), not a Delta per token (node/worker_main.py)
    stream: bool = True
    # seconds it may wait for a free slot; past that the worker answers Failed(Unavailable,
    # code queue_timeout) and the router tries another node or the client gets a 503
    # with Retry-After (set by the router: node config queue_timeout; None: no bound)
    max_wait: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_input(self) -> "Generate":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a Generate request has either messages or a prompt")
        return self

    @property
    def chat(self) -> bool:
        return self.messages is not None


class Embed(_Wire):
    kind: Literal["embed"] = "embed"
    model: str
    inputs: tuple[str, ...] = Field(min_length=1, strict=False)


class Transcribe(_Wire):
    kind: Literal["transcribe"] = "transcribe"
    model: str
    audio: bytes
    language: str | None = None
    prompt: str | None = None
    temperature: float = Field(0.0, ge=0, le=1)


class Tokenize(_Wire):
    """Text (or chat messages, rendered by the model's chat template) as the model's token
    ids; Result data: {"tokens": [...], "pieces": [...] when asked}."""
    kind: Literal["tokenize"] = "tokenize"
    model: str
    content: str | None = None
    messages: tuple[Message, ...] | None = Field(None, strict=False)
    tools: tuple[Tool, ...] = Field((), strict=False)       # rendered with the messages
    add_special: bool = False
    with_pieces: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "Tokenize":
        if (self.messages is None) == (self.content is None):
            raise ValueError("a Tokenize request has either content or messages")
        return self


class Detokenize(_Wire):
    """Token ids back to text; Result data: {"content": str}."""
    kind: Literal["detokenize"] = "detokenize"
    model: str
    tokens: tuple[int, ...] = Field((), strict=False)


class Speak(_Wire):
    """Text to speech: ``input`` read by ``voice`` (a name the backend maps to one of its
    voices, or a 400 naming it) at ``speed`` (Piper: length_scale / speed), encoded as
    ``format`` (the backend refuses one it cannot encode). Streams ``Audio`` events, the
    encoded bytes in order (a header first where the format has one, then the audio of
    each sentence as it is synthesized) and ends with ``Done`` (usage: prompt_tokens =
    phoneme ids read, completion_tokens = audio samples made)."""
    kind: Literal["speak"] = "speak"
    model: str
    input: str = Field(min_length=1)
    voice: str
    speed: float = Field(1.0, ge=0.25, le=4.0)
    format: str = "wav"


Request = Annotated[Union[Generate, Embed, Transcribe, Tokenize, Detokenize, Speak],
                    Field(discriminator="kind")]
_REQUEST = TypeAdapter(Request)

BACKEND_OF = {"generate": "llama", "embed": "llama", "transcribe": "whisper",
              "tokenize": "llama", "detokenize": "llama", "speak": "piper"}
_FEATURE = {"embed": "embeddings", "transcribe": "audio", "tokenize": "completions",
            "detokenize": "completions", "speak": "audio"}


def feature_of(req) -> str:
    """The API-key feature a request needs (mesh/keys.py FEATURES)."""
    if isinstance(req, Generate):
        return "chat" if req.chat else "completions"
    if isinstance(req, Tokenize) and req.messages is not None:
        return "chat"               # counting a chat prompt (/v1/messages/count_tokens)
    return _FEATURE[req.kind]


def capabilities_of(backend: str, info: dict[str, Any] | None = None) -> list[str]:
    """What a model serves (its card's ``capabilities``), from its backend and, when known,
    the worker's ready ``info``: llama chats only with a chat template, embeds unless
    disabled, and lists "tools" when its template renders tools. Without ``info`` (a
    peer that gossips no list), the backend's defaults."""
    if backend != "llama":
        return {"whisper": ["transcription"], "piper": ["speech"]}.get(backend, [])
    info = info or {}
    caps = ["chat"] if info.get("chat_template", True) else []
    caps.append("completions")
    caps += ["embeddings"] if info.get("embeddings", True) else []
    return caps + (["tools"] if info.get("tools") else [])


# -------------------------------------------------------------------- events
class Usage(_Wire):
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    total_tokens: int = Field(0, ge=0)
    cached_tokens: int = Field(0, ge=0)


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: tuple[int, ...] = Field((), strict=False)


class TokenLogprob(_Wire):
    """One generated token: its text, log probability under the model (log-softmax of
    the raw logits, before sampling settings), bytes, and the most likely alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...] = Field((), strict=False)
    top: tuple[TopLogprob, ...] = Field((), strict=False)


class Delta(_Wire):
    """Text, and (when asked) the log probabilities of the tokens generated since the
    previous Delta (a token's text may arrive in a later Delta: UTF-8 and stop strings)."""

    kind: Literal["delta"] = "delta"
    text: str
    logprobs: tuple[TokenLogprob, ...] = Field((), strict=False)
    tool_calls: tuple[ToolCall, ...] = Field((), strict=False)
    index: int = Field(0, ge=0)                 # the choice (Generate.n > 1)
    finish_reason: str | None = None            # this choice ended (n > 1 only)


class Audio(_Wire):
    """A piece of a Speak request's audio, in its format; pieces are concatenated."""

    kind: Literal["audio"] = "audio"
    data: bytes


class Done(_Wire):
    kind: Literal["done"] = "done"
    finish_reason: str = "stop"        # stop | length | cancelled | tool_calls
    usage: Usage = Field(default_factory=Usage)
    stop_sequence: str | None = None   # the stop string that ended it (else EOS or other)


class Result(_Wire):
    kind: Literal["result"] = "result"
    data: dict[str, Any]


class Failed(_Wire):
    kind: Literal["failed"] = "failed"
    error: str = "MeshError"           # a class name of mesh/errors.py
    message: str
    param: str | None = None
    code: str | None = None


class Heartbeat(_Wire):
    kind: Literal["heartbeat"] = "heartbeat"


Event = Annotated[Union[Delta, Audio, Done, Result, Failed, Heartbeat],
                  Field(discriminator="kind")]
_EVENT = TypeAdapter(Event)
TERMINAL = (Done, Result, Failed)


def merged(a: Event, b: Event) -> Delta | None:
    """`a` then `b` as one Delta, when that says the same: both text of one choice, `a`
    not ending it, neither carrying tool calls (their fragments keep their own chunks).
    None when they must stay two events. A consumer that fell behind the worker takes
    what piled up as one event (node/workers.py), so a slow reader costs one write, one
    SSE chunk and one proxy frame per read, not per token."""
    if (type(a) is not Delta or type(b) is not Delta or a.index != b.index
            or a.finish_reason is not None or a.tool_calls or b.tool_calls):
        return None
    return Delta(text=a.text + b.text, logprobs=a.logprobs + b.logprobs, index=a.index,
                 finish_reason=b.finish_reason)


# -------------------------------------------------------------------- codecs
def encode_request(req: Generate | Embed | Transcribe) -> dict[str, Any]:
    return req.model_dump(mode="python")


def decode_request(obj: Any) -> Generate | Embed | Transcribe:
    """A request from the wire; a malformed one is BadRequest naming the field."""
    try:
        return _REQUEST.validate_python(obj)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise errors.BadRequest(f"invalid request: {loc}: {e['msg']}", param=loc or None) from exc


def encode_event(ev: Delta | Done | Result | Failed | Heartbeat) -> dict[str, Any]:
    return ev.model_dump(mode="python")


def decode_event(obj: Any) -> Delta | Done | Result | Failed | Heartbeat:
    try:
        return _EVENT.validate_python(obj)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise errors.BadMessage(f"invalid event: {'.'.join(map(str, e['loc']))}: {e['msg']}") from exc


def failed_from_error(exc: errors.MeshError) -> Failed:
    return Failed(error=errors.name_of(exc), message=exc.message, param=exc.param, code=exc.code)


def error_from_failed(ev: Failed) -> errors.MeshError:
    """The MeshError a Failed event stands for (an unknown class name: the root)."""
    cls = errors.by_name(ev.error)
    return cls(ev.message, param=ev.param, code=ev.code)
