"""The OpenAI Responses dialect: POST /v1/responses, GET/DELETE /v1/responses/{id},
GET /v1/responses/{id}/input_items (docs/responses.md has the field table).

A request is translated into one ``Generate`` (mesh/wire/inference.py): `instructions`
becomes a system message, the input items become the conversation (messages, assistant
`function_call` items as tool calls, `function_call_output` items as tool results), and
`previous_response_id` puts the stored conversation before them. The events come back
as one Response object or as the typed stream: response.created, response.in_progress,
then per output item output_item.added, (content_part.added, output_text.delta...,
output_text.done, content_part.done | function_call_arguments.delta/.done),
output_item.done, and response.completed (response.incomplete when max_output_tokens
cut it); a failure after the first event is an `error` event then response.failed.
Every event carries its sequence_number.

Storage (node/responses.py through the `Services` façade, ``services().responses``):
with `store` (true by default, as OpenAI) the response, its input items and the
conversation before them are kept by this node; the id names this node, so any node of
the mesh reads, continues or deletes it by asking this one (mesh/records.py). A stored
response is visible only to the API key that created it (on a mesh with keys).

Every field of OpenAI's CreateResponse schema is in RESPONSE_FIELDS (honoured, accepted
as meaningless here, or refused with a 400 naming it unless it holds its neutral value);
a field OpenAI does not define is a 400 as well.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from typing import Any, AsyncIterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, Response, request

from api.body import json_body, sse_response
from api.common import (caller, check_tool_choice, collect, function_tool, json_constraint,
                        limit_tokens, node_headers, open_call, services)
from api.errors import json_response
from mesh.errors import BadRequest, MeshError, NotFound
from mesh.router import Call
from mesh.wire.inference import (Delta, Done, Failed, Generate, Message, Sampling,
                                 TokenLogprob, Tool, ToolCall, Usage, error_from_failed)

bp = Blueprint("responses", __name__)

LOGPROBS = "message.output_text.logprobs"
_TEXT_PARTS = ("input_text", "output_text")
_ITEM_KEYS = {"message": {"type", "role", "content", "id", "status", "phase"},
              "function_call": {"type", "id", "call_id", "name", "arguments", "status"},
              "function_call_output": {"type", "id", "call_id", "output", "status"}}
_TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}
_TOOL_NEUTRAL = {"defer_loading": (False,), "output_schema": (None,), "allowed_callers": (None,)}


class ResponsesRequest(BaseModel):
    """CreateResponse: every field of OpenAI's schema, classified in RESPONSE_FIELDS."""
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: str | None = None
    # accepted, meaningless here
    user: str | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast",
                          "ultrafast"] | None = None
    max_tool_calls: int | None = Field(None, ge=0)
    # refused unless neutral
    background: bool | None = None
    conversation: Any = None
    context_management: Any = None
    moderation: Any = None
    prompt: Any = None
    prompt_cache_options: Any = None
    reasoning: Any = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return v


H, A, R = "honoured", "accepted", "refused"
RESPONSE_FIELDS = {
    "model": H, "input": H, "instructions": H, "max_output_tokens": H, "temperature": H,
    "top_p": H, "tools": H, "tool_choice": H, "parallel_tool_calls": H, "text": H,
    "previous_response_id": H, "store": H, "metadata": H, "stream": H, "stream_options": H,
    "include": H, "top_logprobs": H, "truncation": H,
    "user": A, "safety_identifier": A, "prompt_cache_key": A, "prompt_cache_retention": A,
    "service_tier": A, "max_tool_calls": A,
    "background": R, "conversation": R, "context_management": R, "moderation": R,
    "prompt": R, "prompt_cache_options": R, "reasoning": R,
}
NEUTRAL: dict[str, tuple[Any, ...]] = {"background": (None, False), "reasoning": (None, {})}


def _refuse_unsupported(req: ResponsesRequest) -> None:
    for name in sorted(req.model_fields_set):
        if RESPONSE_FIELDS.get(name) == R and getattr(req, name) not in NEUTRAL.get(name, (None,)):
            raise BadRequest(f"'{name}' is not supported by this server yet; remove it from "
                             "the request", param=name, code="unsupported_parameter")
    if req.truncation not in (None, "disabled"):
        raise BadRequest("truncation 'auto' is not supported yet: an input beyond the model's "
                         "context is a 400", param="truncation", code="unsupported_parameter")
    for i, inc in enumerate(req.include or ()):
        if inc != LOGPROBS:
            raise BadRequest(f"include {inc!r} is not supported: this node has no built-in "
                             f"tools, images or reasoning; only {LOGPROBS!r}",
                             param=f"include[{i}]", code="unsupported_parameter")
    if set(req.stream_options or {}) - {"include_obfuscation"}:
        raise BadRequest("stream_options takes only include_obfuscation", param="stream_options")


def _new(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


# ------------------------------------------------------------------ input items
def _text_of(parts: Any, param: str) -> str:
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise BadRequest(f"{param} must be a string or a list of text parts", param=param)
    out = []
    for j, p in enumerate(parts):
        if not isinstance(p, dict) or p.get("type") not in _TEXT_PARTS or not isinstance(p.get("text"), str):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise BadRequest(f"content part of type {kind!r} is not supported; this node takes "
                             "input_text and output_text parts", param=f"{param}[{j}]",
                             code="unsupported_parameter")
        out.append(p["text"])
    return "".join(out)


def _item(x: Any, i: int) -> dict[str, Any]:
    """One input item, normalised to the shape input_items lists (ids given)."""
    param = f"input[{i}]"
    if not isinstance(x, dict):
        raise BadRequest(f"{param} must be an object", param=param)
    kind = x.get("type", "message")
    if kind not in _ITEM_KEYS:
        raise BadRequest(f"input items of type {kind!r} are not supported; this node takes "
                         "message, function_call and function_call_output items",
                         param=f"{param}.type", code="unsupported_parameter")
    for key in sorted(set(x) - _ITEM_KEYS[kind]):
        raise BadRequest(f"unrecognized field of a {kind} item: {key}", param=f"{param}.{key}")
    given_id = x.get("id")
    if given_id is not None and (not isinstance(given_id, str) or not given_id):
        raise BadRequest(f"{param}.id must be a non-empty string", param=f"{param}.id")
    if kind == "message":
        role = x.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise BadRequest(f"{param}.role must be user, assistant, system or developer",
                             param=f"{param}.role")
        text = _text_of(x.get("content"), f"{param}.content")
        part = _part(text, []) if role == "assistant" else {"type": "input_text", "text": text}
        return {"id": given_id or _new("msg_"), "type": "message", "role": role,
                "content": [part], "status": "completed"}
    for key in ("call_id",) + (("name", "arguments") if kind == "function_call" else ()):
        if not isinstance(x.get(key), str) or not x[key]:
            raise BadRequest(f"a {kind} item needs '{key}' (a string)", param=f"{param}.{key}")
    if kind == "function_call":
        return {"id": given_id or _new("fc_"), "type": kind, "call_id": x["call_id"],
                "name": x["name"], "arguments": x["arguments"], "status": "completed"}
    return {"id": given_id or _new("fco_"), "type": kind, "call_id": x["call_id"],
            "output": _text_of(x.get("output"), f"{param}.output"), "status": "completed"}


def _messages(items: list[dict[str, Any]]) -> list[Message]:
    """Items (inputs and earlier outputs) as the chat the model sees."""
    out: list[Message] = []
    for it in items:
        if it["type"] == "message":
            out.append(Message(role=it["role"], content="".join(p["text"] for p in it["content"])))
        elif it["type"] == "function_call":
            tc = ToolCall(id=it["call_id"], name=it["name"], arguments=it["arguments"])
            if out and out[-1].role == "assistant":
                out[-1] = out[-1].model_copy(update={"tool_calls": (*out[-1].tool_calls, tc)})
            else:
                out.append(Message(role="assistant", tool_calls=(tc,)))
        else:
            out.append(Message(role="tool", content=it["output"], tool_call_id=it["call_id"]))
    return out


# ---------------------------------------------------------- tools, text format
def _tools(req: ResponsesRequest) -> tuple[tuple[Tool, ...], str, list[dict[str, Any]], Any]:
    """(tools, tool_choice for Generate, tools echoed, tool_choice echoed)."""
    tools, echo = [], []
    for i, t in enumerate(req.tools or []):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise BadRequest(f"tools[{i}]: only function tools are supported, not {kind!r}",
                             param=f"tools[{i}].type", code="unsupported_parameter")
        for key in sorted(set(t) - _TOOL_KEYS):
            if t[key] not in _TOOL_NEUTRAL.get(key, ()):
                raise BadRequest(f"tools[{i}].{key} is not supported", param=f"tools[{i}].{key}",
                                 code="unsupported_parameter")
        if t.get("strict") not in (None, True, False):
            raise BadRequest(f"tools[{i}].strict must be a boolean", param=f"tools[{i}].strict")
        tool = function_tool(t.get("name"), t.get("description"), t.get("parameters"), f"tools[{i}]")
        tools.append(tool)
        echo.append({"type": "function", "name": tool.name, "description": tool.description or None,
                     "parameters": tool.parameters, "strict": t.get("strict") is not False})
    given = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    choice, allowed = given, tools
    if isinstance(given, dict):
        if given.get("type") == "function" and isinstance(given.get("name"), str):
            choice = given["name"]
        elif given.get("type") == "allowed_tools" and given.get("mode") in ("auto", "required"):
            listed = given.get("tools")
            names = [a.get("name") for a in listed if isinstance(a, dict)
                     and a.get("type") == "function"] if isinstance(listed, list) else []
            if not names or len(names) != len(listed):
                raise BadRequest("tool_choice.tools must list function tools by name",
                                 param="tool_choice.tools")
            allowed = [t for t in tools if t.name in names]
            if len(allowed) != len(set(names)):
                raise BadRequest("tool_choice.tools names a function that is not among the tools",
                                 param="tool_choice.tools")
            choice = given["mode"]
        else:
            raise BadRequest("tool_choice must be none, auto, required, {'type': 'function', "
                             "'name': ...} or {'type': 'allowed_tools', ...}",
                             param="tool_choice", code="unsupported_parameter")
    elif given not in ("none", "auto", "required"):
        raise BadRequest("tool_choice must be none, auto or required", param="tool_choice")
    return tuple(allowed), check_tool_choice(choice, tuple(allowed)), echo, given


_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"},
                "json_schema": {"type", "name", "schema", "strict", "description"}}


def _text_format(text: dict[str, Any] | None):
    """(the worker's constraint or None, the `text` echoed)."""
    text = dict(text or {})
    for key in sorted(set(text) - {"format", "verbosity"}):
        raise BadRequest(f"unrecognized field of text: {key}", param=f"text.{key}")
    if text.get("verbosity") not in (None, "medium"):
        raise BadRequest("text.verbosity other than 'medium' is not supported by these models",
                         param="text.verbosity", code="unsupported_parameter")
    fmt = text.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in _FORMAT_KEYS:
        raise BadRequest("text.format.type must be text, json_object or json_schema",
                         param="text.format.type")
    for key in sorted(set(fmt) - _FORMAT_KEYS[kind]):
        raise BadRequest(f"unrecognized field of text.format: {key}", param=f"text.format.{key}")
    echo = {"format": fmt, "verbosity": "medium"}
    if kind != "json_schema":
        return (json_constraint(None) if kind == "json_object" else None), echo
    name, schema = fmt.get("name"), fmt.get("schema")
    if not isinstance(name, str) or not name:
        raise BadRequest("text.format of type json_schema needs a 'name'", param="text.format.name")
    if not isinstance(schema, dict):
        raise BadRequest("text.format of type json_schema needs a 'schema' object",
                         param="text.format.schema")
    if not isinstance(fmt.get("description", ""), str):
        raise BadRequest("text.format.description must be a string",
                         param="text.format.description")
    return json_constraint(schema, param="text.format.schema"), echo


# ------------------------------------------------------------ response object
def _usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


def _logprobs(lps: tuple[TokenLogprob, ...] | list[TokenLogprob], *, stream: bool) -> list[dict]:
    """output_text's LogProb (bytes included) or a delta event's ResponseLogProb."""
    def one(t) -> dict[str, Any]:
        return {"token": t.token, "logprob": t.logprob} if stream else {
            "token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
    return [{**one(t), "top_logprobs": [one(x) for x in t.top]} for t in lps]


def _part(text: str, logprobs: list[dict]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _message(mid: str, text: str, status: str, logprobs: list[dict]) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "status": status,
            "content": [_part(text, logprobs)]}


def _function_call(c: ToolCall, status: str = "completed", arguments: str | None = None) -> dict:
    return {"id": "fc_" + secrets.token_hex(24), "type": "function_call", "call_id": c.id,
            "name": c.name, "arguments": c.arguments if arguments is None else arguments,
            "status": status}


class _Turn:
    """One request's constants: what every Response object of it repeats."""

    def __init__(self, req: ResponsesRequest, tools_echo, choice_echo, text_echo,
                 want_logprobs: bool) -> None:
        self.responses = services().responses      # streams run outside the app context
        self.key_id = (caller() or {}).get("key_id")
        self.want_logprobs = want_logprobs
        self.store = req.store is not False
        self.id = self.responses.new_id()
        self.created = int(time.time())
        self.base = {
            "id": self.id, "object": "response", "created_at": self.created,
            "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": req.max_tool_calls,
            "model": req.model, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
            "store": self.store, "temperature": req.temperature, "text": text_echo,
            "tool_choice": choice_echo, "tools": tools_echo,
            "top_logprobs": req.top_logprobs or 0, "top_p": req.top_p,
            "truncation": "disabled", "metadata": req.metadata or {},
            "background": False}
        for name in ("user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention"):
            if getattr(req, name) is not None:
                self.base[name] = getattr(req, name)

    def obj(self, status: str, output: list[dict[str, Any]], usage: Usage | None = None,
            error: MeshError | None = None) -> dict[str, Any]:
        out = {**self.base, "status": status, "output": output,
               "completed_at": int(time.time()) if status != "in_progress" else None}
        if usage is not None:
            out["usage"] = _usage(usage)
        if status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        if error is not None:
            out["error"] = {"code": "server_error", "message": error.message}
        return out

    async def keep(self, response: dict[str, Any], items: list[dict[str, Any]],
                   context: list[dict[str, Any]]) -> None:
        """Store the response (unless store is false) with what rebuilds its conversation."""
        if self.store:
            record = {"response": response, "input_items": items, "context": context}
            await self.responses.put(self.id, record, self.key_id)


def _status(finish: str) -> str:
    return "incomplete" if finish == "length" else "completed"


# ------------------------------------------------------------------- create
@bp.post("/v1/responses")
async def create_response():
    return await run_response(await json_body(ResponsesRequest))


async def run_response(req: ResponsesRequest) -> Response:
    """A validated Responses request, answered (streamed or not); also a batch line's path."""
    _refuse_unsupported(req)
    if req.input is None or req.input == [] or req.input == "":
        raise BadRequest("you must provide 'input'", param="input",
                         code="missing_required_parameter")
    raw = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    items = [_item(x, i) for i, x in enumerate(raw)]
    tools, choice, tools_echo, choice_echo = _tools(req)
    constraint, text_echo = _text_format(req.text)
    n_logprobs = (req.top_logprobs or 0) if (LOGPROBS in (req.include or ())
                                              or req.top_logprobs is not None) else None
    context: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        try:
            prev = await services().responses.fetch(req.previous_response_id, caller())
        except NotFound:
            raise NotFound(f"Previous response with id '{req.previous_response_id}' not found.",
                           param="previous_response_id",
                           code="previous_response_not_found") from None
        context = [*prev["context"], *prev["input_items"], *prev["response"]["output"]]
    # a json_schema's description is for the model (OpenAI: "used by the model to determine
    # how to respond in the format"): it joins the instructions
    about = text_echo["format"].get("description") if constraint is not None else None
    note = f"Respond in the format {text_echo['format']['name']!r}: {about}" if about else None
    said = "\n\n".join(x for x in (req.instructions, note) if x)
    system = [Message(role="system", content=said)] if said else []
    gen = Generate(model=req.model, messages=tuple(system + _messages(context + items)),
                   max_tokens=limit_tokens(req.max_output_tokens, "max_output_tokens"),
                   sampling=Sampling(temperature=req.temperature, top_p=req.top_p),
                   response_format=constraint, logprobs=n_logprobs, tools=tools,
                   tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls is not False,
                   stream=bool(req.stream))
    turn = _Turn(req, tools_echo, choice_echo, text_echo, n_logprobs is not None)
    call = await open_call(gen)
    if req.stream:
        obfuscate = (req.stream_options or {}).get("include_obfuscation", True) is not False
        return sse_response(_stream(call, turn, items, context, obfuscate),
                            headers=node_headers(call))
    got = await collect(call)
    output = []
    if got.text or not got.tool_calls:
        lps = _logprobs(got.logprobs, stream=False) if turn.want_logprobs else []
        output.append(_message(_new("msg_"), got.text, _status(got.finish_reason), lps))
    output += [_function_call(c) for c in got.tool_calls]
    response = turn.obj(_status(got.finish_reason), output, got.usage)
    await turn.keep(response, items, context)
    return json_response(response, headers=node_headers(call))


class _Events:
    """The typed events of one streamed response, numbered, and the output they build."""

    def __init__(self, turn: _Turn, obfuscate: bool) -> None:
        self.turn, self.obfuscate = turn, obfuscate
        self.seq = itertools.count()
        self.output: list[dict[str, Any]] = []
        self.msg_id: str | None = None           # the message item being written, if any
        self.text: list[str] = []
        self.logprobs: list[TokenLogprob] = []

    def ev(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, **fields, "sequence_number": next(self.seq)}
        return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()

    def pad(self, delta: str) -> dict[str, str]:
        """Stream obfuscation (OpenAI's, on by default): random characters that even out
        the sizes of delta events."""
        if not self.obfuscate:
            return {}
        return {"obfuscation": secrets.token_urlsafe(12)[: 16 - len(delta) % 16]}

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.msg_id, "output_index": len(self.output), "content_index": 0}

    def open_message(self) -> list[bytes]:
        self.msg_id, self.text, self.logprobs = _new("msg_"), [], []
        item = {**_message(self.msg_id, "", "in_progress", []), "content": []}
        return [self.ev("response.output_item.added", output_index=len(self.output), item=item),
                self.ev("response.content_part.added", **self._at(), part=_part("", []))]

    def text_delta(self, e: Delta) -> list[bytes]:
        out = self.open_message() if self.msg_id is None else []
        self.text.append(e.text)
        lps = list(e.logprobs) if self.turn.want_logprobs else []
        self.logprobs += lps
        out.append(self.ev("response.output_text.delta", **self._at(), delta=e.text,
                           logprobs=_logprobs(lps, stream=True), **self.pad(e.text)))
        return out

    def end_message(self, status: str) -> list[bytes]:
        if self.msg_id is None:
            return []
        lps = self.logprobs if self.turn.want_logprobs else []
        done = _message(self.msg_id, "".join(self.text), status, _logprobs(lps, stream=False))
        part = done["content"][0]
        out = [self.ev("response.output_text.done", **self._at(), text=part["text"],
                       logprobs=_logprobs(lps, stream=True)),
               self.ev("response.content_part.done", **self._at(), part=part),
               self.ev("response.output_item.done", output_index=len(self.output), item=done)]
        self.output.append(done)
        self.msg_id = None
        return out

    def function_call(self, c: ToolCall) -> list[bytes]:
        out = self.end_message("completed")
        item = _function_call(c, "in_progress", arguments="")
        at = {"item_id": item["id"], "output_index": len(self.output)}
        item_done = {**item, "arguments": c.arguments, "status": "completed"}
        out += [self.ev("response.output_item.added", output_index=len(self.output), item=item),
                self.ev("response.function_call_arguments.delta", **at, delta=c.arguments,
                        **self.pad(c.arguments)),
                self.ev("response.function_call_arguments.done", **at, name=c.name,
                        arguments=c.arguments),
                self.ev("response.output_item.done", output_index=len(self.output), item=item_done)]
        self.output.append(item_done)
        return out


async def _stream(call: Call, turn: _Turn, items: list[dict[str, Any]],
                  context: list[dict[str, Any]], obfuscate: bool) -> AsyncIterator[bytes]:
    """The event stream of one response (module note); stored once it has ended."""
    out = _Events(turn, obfuscate)
    try:
        yield out.ev("response.created", response=turn.obj("in_progress", []))
        yield out.ev("response.in_progress", response=turn.obj("in_progress", []))
        async for e in call.events():
            chunks: list[bytes] = []
            if isinstance(e, Delta):
                if e.text:
                    chunks += out.text_delta(e)
                for c in e.tool_calls:
                    chunks += out.function_call(c)
            elif isinstance(e, Done):
                status = _status(e.finish_reason)
                if out.msg_id is None and not out.output:      # nothing said: one empty message
                    chunks += out.open_message()
                chunks += out.end_message(status)
                response = turn.obj(status, out.output, e.usage)
                await turn.keep(response, items, context)
                chunks.append(out.ev(f"response.{status}", response=response))
            elif isinstance(e, Failed):
                exc = error_from_failed(e)
                response = turn.obj("failed", out.output, error=exc)
                await turn.keep(response, items, context)
                chunks += [out.ev("error", code=exc.code, message=exc.message, param=exc.param),
                           out.ev("response.failed", response=response)]
            for chunk in chunks:
                yield chunk
    finally:
        await call.aclose()


# ------------------------------------------------------------- stored ones
def _query_list(name: str) -> list[str]:
    return request.args.getlist(name) + request.args.getlist(f"{name}[]")


@bp.get("/v1/responses/<response_id>")
async def get_response(response_id: str):
    if request.args.get("stream", "false").lower() not in ("false", "0"):
        raise BadRequest("streaming a stored response again is not supported; GET it whole",
                         param="stream", code="unsupported_parameter")
    for name in ("starting_after", "include_obfuscation"):
        if name in request.args:
            raise BadRequest(f"'{name}' applies only to stream=true, which this node does not "
                             "support here", param=name, code="unsupported_parameter")
    _check_include()
    record = await _stored(response_id)
    return json_response(record["response"], headers=node_headers())


@bp.delete("/v1/responses/<response_id>")
async def delete_response(response_id: str):
    try:
        await services().responses.remove(response_id, caller())
    except NotFound:
        raise _not_found(response_id) from None
    return json_response({"id": response_id, "object": "response", "deleted": True},
                         headers=node_headers())


@bp.get("/v1/responses/<response_id>/input_items")
async def input_items(response_id: str):
    args = request.args
    try:
        limit = int(args.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise BadRequest("limit must be an integer between 1 and 100", param="limit")
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be asc or desc", param="order")
    _check_include()
    items = (await _stored(response_id))["input_items"]
    if order == "desc":
        items = items[::-1]
    after = args.get("after")
    if after is not None:
        ids = [it["id"] for it in items]
        if after not in ids:
            raise BadRequest(f"no input item with id {after!r} in this response", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return json_response({"object": "list", "data": page,
                          "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None,
                          "has_more": len(items) > limit}, headers=node_headers())


def _check_include() -> None:
    for inc in _query_list("include"):
        if inc != LOGPROBS:
            raise BadRequest(f"include {inc!r} is not supported; only {LOGPROBS!r}",
                             param="include", code="unsupported_parameter")


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


async def _stored(response_id: str) -> dict[str, Any]:
    try:
        return await services().responses.fetch(response_id, caller())
    except NotFound:
        raise _not_found(response_id) from None
