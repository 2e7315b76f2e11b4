"""The Anthropic Messages dialect, for the official `anthropic` SDK.

    POST /v1/messages               a message, or Anthropic's SSE events (stream: true)
    POST /v1/messages/count_tokens  {"input_tokens"}: the prompt as the template renders it

A thin adapter like api/openai_routes.py: the body is validated (``MessagesRequest``, every
field of Anthropic's MessageCreateParams classified in ``FIELDS``, docs/anthropic.md prints
the table), translated into one ``Generate`` (mesh/wire/inference.py), sent through the
router, and the events are turned back into a ``message`` or Anthropic's SSE events.

Translation:
    system (string | text blocks)        -> a leading system Message
    user text blocks                     -> a user Message (blocks joined by a blank line)
    user tool_result blocks              -> tool Messages (tool_call_id = tool_use_id), in
                                            order; is_error renders as "Error: <content>"
    assistant text + tool_use blocks     -> one assistant Message with tool_calls
    tools[].input_schema                 -> Tool.parameters (the enforced schema subset)
    output_config.format (json_schema)   -> Generate.response_format (grammar-constrained)
    tool_choice auto|any|tool|none       -> "auto" | "required" | the name | "none";
                                            disable_parallel_tool_use -> parallel_tool_calls
    Done.finish_reason                   -> stop_reason: length -> max_tokens, tool_calls ->
                                            tool_use, a stop string of the request ->
                                            stop_sequence (Done.stop_sequence), else end_turn
    Usage                                -> input_tokens (not read from the cache),
                                            cache_read_input_tokens, output_tokens

Streaming: message_start, ping, then per content block content_block_start,
content_block_delta (text_delta | input_json_delta), content_block_stop, then
message_delta (stop_reason, stop_sequence, usage) and message_stop. The token counts are
only known at the end (the wire's Done), so message_start's usage is zero and
message_delta carries the final counts, input tokens included (the SDK folds them into
the final message). A text block opens at the first text and closes before a tool_use
block; each tool call arrives whole from the worker (its JSON is parsed once the forced
block ends) and is sent as one input_json_delta. A failure after the first byte is an
``error`` event, as Anthropic sends one (the status line is gone). Errors before it are
ordinary responses in Anthropic's error shape (api/errors.py picks it by path).

Refused with a 400 naming it: image, document, thinking and every other non-text block
type, server tools, extended thinking, a trailing assistant message (prefill: the chat
template cannot continue a turn), the anthropic-beta header, and fields Anthropic does not
define.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from quart import Blueprint, request

from api.body import json_body, sse, sse_response
from api.common import (check_tool_choice, function_tool, json_constraint, limit_tokens,
                        node_headers, open_call, result)
from api.errors import anthropic_error, json_response
from mesh.errors import BadRequest, MeshError
from mesh.router import Call
from mesh.wire.inference import (Delta, Done, Failed, Generate, Message, Sampling, Tokenize,
                                 Tool, ToolCall, Usage, error_from_failed)
from mesh.wire.inference import ResponseFormat as Constraint
from mesh.wire.schema import check_schema

bp = Blueprint("anthropic", __name__)

H, A, R = "honoured", "accepted", "refused"
# Every field of Anthropic's MessageCreateParams (tests/test_anthropic.py checks the SDK's
# list against this one): honoured, accepted (meaningless here, changes nothing) or
# refused (a 400 naming it unless it holds its neutral value, NEUTRAL). The SDK sends
# user_profile_id and workspace_id as headers (anthropic-user-profile-id, -workspace-id).
FIELDS = {
    "model": H, "messages": H, "max_tokens": H, "system": H, "stop_sequences": H,
    "temperature": H, "top_p": H, "top_k": H, "tools": H, "tool_choice": H, "stream": H,
    "service_tier": H, "output_config": H,
    "metadata": A, "cache_control": A, "user_profile_id": A, "workspace_id": A,
    "thinking": R, "speed": R, "container": R, "diagnostics": R, "inference_geo": R,
}
NEUTRAL: dict[str, tuple[Any, ...]] = {"thinking": (None, {"type": "disabled"}),
                                       "speed": (None, "standard")}
BLOCKS = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use")}


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class JsonFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: JsonFormat | None = None
    effort: str | None = None     # refused: one effort level here


class MessagesPrompt(BaseModel):
    """What both /v1/messages and /v1/messages/count_tokens take: the prompt and tools."""
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None    # accepted: the prefix cache is automatic
    thinking: dict[str, Any] | None = None
    speed: str | None = None


class MessagesRequest(MessagesPrompt):
    """Anthropic's Messages request body (https://docs.anthropic.com/en/api/messages)."""
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    # one tier here, standard: what both values allow
    service_tier: Literal["auto", "standard_only"] | None = None
    metadata: dict[str, Any] | None = None        # {user_id}: nothing is stored or billed
    container: Any = None
    diagnostics: Any = None
    inference_geo: Any = None


# ------------------------------------------------------------ content blocks
class _Block(BaseModel):
    # cache_control: accepted; each slot reuses the prefix it cached (no breakpoints)
    model_config = ConfigDict(extra="forbid")
    cache_control: dict[str, Any] | None = None


class TextBlock(_Block):
    type: Literal["text"]
    text: str
    citations: list[Any] | None = Field(None, max_length=0)


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[dict[str, Any]] | None = None
    is_error: bool = False


class ToolDef(_Block):
    type: Literal["custom"] | None = None
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


_MODELS = {"text": TextBlock, "tool_use": ToolUseBlock, "tool_result": ToolResultBlock}


def _parse(model: type[BaseModel], obj: Any, param: str) -> Any:
    """`obj` as `model`; the first complaint as a 400 naming the field."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = param + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"])
        msg = ("unrecognized field" if e["type"] == "extra_forbidden" else
               "field required" if e["type"] == "missing" else e["msg"])
        raise BadRequest(f"{loc}: {msg}", param=loc) from exc


def _block(obj: Any, allowed: tuple[str, ...], param: str) -> Any:
    kind = obj.get("type") if isinstance(obj, dict) else None
    kind = kind if isinstance(kind, str) else None
    if kind not in allowed:
        what = "is not allowed here" if kind in _MODELS else "is not supported by this server"
        raise BadRequest(f"{param}: content block type {kind!r} {what} (allowed: "
                         f"{', '.join(allowed)})", param=f"{param}.type")
    return _parse(_MODELS[kind], obj, param)


def _text(blocks: str | list[dict[str, Any]] | None, param: str) -> str:
    """A string, or text blocks joined by a blank line (system, tool_result content)."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    return "\n\n".join(_block(b, ("text",), f"{param}[{i}]").text for i, b in enumerate(blocks))


def _turns(req: MessagesPrompt) -> tuple[Message, ...]:
    out = [Message(role="system", content=_text(req.system, "system"))] if req.system else []
    if req.messages[-1].role == "assistant":
        raise BadRequest("the last message is an assistant turn (prefill); this server cannot "
                         "continue a turn: end with a user message", param="messages")
    for i, m in enumerate(req.messages):
        if not m.content:
            raise BadRequest(f"messages[{i}]: content must not be empty",
                             param=f"messages[{i}].content")
        if isinstance(m.content, str):
            out.append(Message(role=m.role, content=m.content))
            continue
        text: list[str] = []
        calls: list[ToolCall] = []
        for j, raw in enumerate(m.content):
            p = f"messages[{i}].content[{j}]"
            b = _block(raw, BLOCKS[m.role], p)
            if isinstance(b, TextBlock):
                text.append(b.text)
            elif isinstance(b, ToolUseBlock):
                calls.append(ToolCall(id=b.id, name=b.name, arguments=json.dumps(b.input)))
            else:                                        # a tool_result: its own tool turn
                if text:
                    out.append(Message(role="user", content="\n\n".join(text)))
                    text = []
                result = _text(b.content, f"{p}.content")
                out.append(Message(role="tool", tool_call_id=b.tool_use_id,
                                   content=f"Error: {result}" if b.is_error else result))
        if text or calls or m.role == "assistant":
            out.append(Message(role=m.role, content="\n\n".join(text), tool_calls=tuple(calls)))
    return tuple(out)


def _tools(req: MessagesPrompt) -> tuple[tuple[Tool, ...], str, bool]:
    tools = []
    for i, raw in enumerate(req.tools or []):
        if isinstance(raw, dict) and raw.get("type") not in (None, "custom"):
            raise BadRequest(f"tools[{i}]: server tool {raw.get('type')!r} is not supported by "
                             "this server; define a custom tool (name, input_schema)",
                             param=f"tools[{i}].type")
        t = _parse(ToolDef, raw, f"tools[{i}]")
        check_schema(t.input_schema, param=f"tools[{i}].input_schema")
        tools.append(function_tool(t.name, t.description, t.input_schema, f"tools[{i}]"))
    tc = _parse(ToolChoice, req.tool_choice, "tool_choice") if req.tool_choice else None
    if tc is not None and (tc.type == "tool") != (tc.name is not None):
        raise BadRequest("tool_choice: 'name' goes with type 'tool', and only with it",
                         param="tool_choice.name")
    kind = tc.type if tc is not None else ("auto" if tools else "none")
    choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or tc.name
    return (tuple(tools), check_tool_choice(choice, tuple(tools)),
            not (tc is not None and tc.disable_parallel_tool_use))


def _constraint(oc: OutputConfig | None) -> Constraint | None:
    """output_config.format (JSON valid for a schema) as the worker's constraint."""
    if oc is not None and oc.effort is not None:
        raise BadRequest("output_config.effort is not supported by this server; remove it",
                         param="output_config.effort", code="unsupported_parameter")
    if oc is None or oc.format is None:
        return None
    return json_constraint(oc.format.schema_, param="output_config.format.schema")


def _refuse(req: MessagesPrompt) -> None:
    for name in sorted(req.model_fields_set):
        if FIELDS.get(name) == R and getattr(req, name) not in NEUTRAL.get(name, (None,)):
            raise BadRequest(f"'{name}' is not supported by this server; remove it from the "
                             "request", param=name, code="unsupported_parameter")
    beta = request.headers.get("anthropic-beta")
    if beta:
        raise BadRequest(f"anthropic-beta {beta!r}: beta features are not supported by this "
                         "server", param="anthropic-beta", code="unsupported_parameter")


# ------------------------------------------------------------------ answers
def _usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens":
            u.completion_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": u.cached_tokens, "service_tier": "standard"}


def _stop(done: Done, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence); only the request's own stop strings are named (the
    model's end-of-turn text is also a stop string in the worker)."""
    if done.finish_reason == "tool_calls":
        return "tool_use", None
    if done.finish_reason == "length":
        return "max_tokens", None
    if done.stop_sequence is not None and done.stop_sequence in stops:
        return "stop_sequence", done.stop_sequence
    return "end_turn", None


def _tool_use(c: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": "toolu_" + c.id.removeprefix("call_"), "name": c.name,
            "input": json.loads(c.arguments or "{}")}


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\n".encode() + sse({"type": kind, **obj})


def _stream(call: Call, message: dict[str, Any], stops: tuple[str, ...]) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        index, open_text = -1, False
        try:
            yield _event("message_start", {"message": {
                **message, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": _usage(Usage())}})
            yield _event("ping", {})
            async for ev in call.events():
                if isinstance(ev, Delta):
                    if ev.text and not open_text:
                        index, open_text = index + 1, True
                        yield _event("content_block_start", {
                            "index": index, "content_block": {"type": "text", "text": ""}})
                    if ev.text:
                        yield _event("content_block_delta", {
                            "index": index, "delta": {"type": "text_delta", "text": ev.text}})
                    for c in ev.tool_calls:
                        if open_text:
                            yield _event("content_block_stop", {"index": index})
                            open_text = False
                        index += 1
                        yield _event("content_block_start", {
                            "index": index, "content_block": {**_tool_use(c), "input": {}}})
                        yield _event("content_block_delta", {"index": index, "delta": {
                            "type": "input_json_delta", "partial_json": c.arguments}})
                        yield _event("content_block_stop", {"index": index})
                elif isinstance(ev, Done):
                    if open_text:
                        yield _event("content_block_stop", {"index": index})
                    reason, seq = _stop(ev, stops)
                    yield _event("message_delta", {
                        "delta": {"stop_reason": reason, "stop_sequence": seq},
                        "usage": _usage(ev.usage)})
                    yield _event("message_stop", {})
                elif isinstance(ev, Failed):
                    yield _event("error", anthropic_error(error_from_failed(ev)))
        finally:
            await call.aclose()

    return body()


async def _collect(call: Call) -> tuple[str, list[ToolCall], Done]:
    text: list[str] = []
    calls: list[ToolCall] = []
    try:
        async for ev in call.events():
            if isinstance(ev, Delta):
                text.append(ev.text)
                calls.extend(ev.tool_calls)
            elif isinstance(ev, Done):
                return "".join(text), calls, ev
            elif isinstance(ev, Failed):
                raise error_from_failed(ev)
    finally:
        await call.aclose()
    raise MeshError("the generation ended without a result")


@bp.post("/v1/messages")
async def messages():
    req = await json_body(MessagesRequest)
    _refuse(req)
    tools, choice, parallel = _tools(req)
    stops = tuple(req.stop_sequences or ())
    sampling = Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
    gen = Generate(model=req.model, messages=_turns(req), max_tokens=limit_tokens(req.max_tokens),
                   stop=stops, sampling=sampling, tools=tools, tool_choice=choice,
                   parallel_tool_calls=parallel, response_format=_constraint(req.output_config),
                   stream=bool(req.stream))
    call = await open_call(gen)
    message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
               "model": req.model}
    if req.stream:
        return sse_response(_stream(call, message, stops), headers=node_headers(call))
    text, calls, done = await _collect(call)
    reason, seq = _stop(done, stops)
    content = ([{"type": "text", "text": text}] if text else []) + [_tool_use(c) for c in calls]
    return json_response({**message, "content": content, "stop_reason": reason,
                          "stop_sequence": seq, "usage": _usage(done.usage)},
                         headers=node_headers(call))


@bp.post("/v1/messages/count_tokens")
async def count_tokens():
    """The prompt's tokens as the model's chat template renders it (the wire's Tokenize)."""
    req = await json_body(MessagesPrompt)
    _refuse(req)
    tools, _, _ = _tools(req)                     # checked as /v1/messages does
    _constraint(req.output_config)
    res, call = await result(Tokenize(model=req.model, messages=_turns(req), tools=tools))
    return json_response({"input_tokens": len(res["tokens"])}, headers=node_headers(call))
