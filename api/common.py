"""What every dialect adapter shares: the services, the caller, the router call and the
typed events gathered back, tool and schema checks.

Each dialect (api/openai_routes.py, api/responses_routes.py, api/anthropic_routes.py,
api/ollama_routes.py) is a thin translation between its JSON and mesh/wire/inference.py;
the steps they have in common live here so that a rule (a token cap, a schema subset, the
node header) is written once.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from quart import current_app, request

from mesh.errors import BadRequest, MeshError
from mesh.router import Call
from mesh.wire.inference import (Delta, Done, Failed, Generate, Result, TokenLogprob, Tool,
                                 ToolCall, Usage, error_from_failed)
from mesh.wire.inference import ResponseFormat as Constraint
from mesh.wire.schema import check_schema


def services():
    return current_app.config["MESH"]


# Set by work done on a caller's behalf outside an HTTP request (node/batches.py runs a
# batch's lines as the key that created it); otherwise the request's caller is used.
ON_BEHALF: ContextVar[dict[str, Any] | None] = ContextVar("on_behalf_of")


def caller() -> dict[str, Any] | None:
    """The authenticated caller (api/auth.py), None on an open mesh."""
    who = ON_BEHALF.get(_UNSET)
    if who is not _UNSET:
        return who
    return (request.scope.get("extensions") or {}).get("mesh.caller")


_UNSET: Any = object()
# Set for batch lines (node/batches.py): generations are sent as background work.
BACKGROUND: ContextVar[bool] = ContextVar("background", default=False)


def node_headers(call: Call | None = None) -> dict[str, str]:
    """`x-mesh-node`: the node that served the request (a peer when proxied), and
    `x-mesh-route`: why it went there (mesh/router.py Target.reason)."""
    svc = services()
    node = call.served_by if call is not None and call.target.peer is not None else svc.node_name
    out = {"x-mesh-node": node}
    if call is not None and call.target.reason:
        out["x-mesh-route"] = call.target.reason
    return out


def limit_tokens(n: int | None, param: str = "max_tokens") -> int | None:
    """The mesh's token cap (config.max_tokens_limit): a larger ask is a 400, none gets it."""
    cap = services().config.max_tokens_limit
    if cap and n is not None and n > cap:
        raise BadRequest(f"{param} is {n}, above this mesh's limit of {cap}",
                         param=param, code="invalid_value")
    return cap if (cap and n is None) else n


async def open_call(req) -> Call:
    if BACKGROUND.get() and isinstance(req, Generate):
        req = req.model_copy(update={"background": True})
    return await services().router.open(req, caller=caller())


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Collected:
    """A whole generation: what a non-streaming answer is built from. `choices` holds
    one entry per choice (Generate.n); the plain attributes are choice 0's."""
    choices: list[Choice] = field(default_factory=lambda: [Choice()])
    usage: Usage = field(default_factory=Usage)
    stop_sequence: str | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason or "stop"

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return self.choices[0].logprobs

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.choices[0].tool_calls


async def collect(call: Call, n: int = 1) -> Collected:
    """Read a generation to its Done; a Failed event is raised as its error."""
    out = Collected(choices=[Choice() for _ in range(n)])
    parts: list[list[str]] = [[] for _ in range(n)]
    try:
        async for ev in call.events():
            if isinstance(ev, Delta):
                c = out.choices[ev.index]
                parts[ev.index].append(ev.text)
                c.logprobs.extend(ev.logprobs)
                c.tool_calls.extend(ev.tool_calls)
                if ev.finish_reason is not None:
                    c.finish_reason = ev.finish_reason
            elif isinstance(ev, Done):
                for c, p in zip(out.choices, parts):
                    c.text = "".join(p)
                    c.finish_reason = c.finish_reason or ev.finish_reason
                out.usage, out.stop_sequence = ev.usage, ev.stop_sequence
                return out
            elif isinstance(ev, Failed):
                raise error_from_failed(ev)
    finally:
        await call.aclose()
    raise MeshError("the generation ended without a result")


async def result(req) -> tuple[dict[str, Any], Call]:
    """A one-result request (embeddings, transcription, speech...): its Result's data."""
    call = await open_call(req)
    try:
        async for ev in call.events():
            if isinstance(ev, Result):
                return ev.data, call
            if isinstance(ev, Failed):
                raise error_from_failed(ev)
    finally:
        await call.aclose()
    raise MeshError("the request ended without a result")


def function_tool(name: Any, description: Any, parameters: Any, param: str) -> Tool:
    """One function tool, its parameters checked against the enforced schema subset."""
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{param} needs a function name", param=param)
    params = parameters or {"type": "object", "properties": {}}
    check_schema(params, param=f"{param}.parameters")
    return Tool(name=name, description=str(description or ""), parameters=params)


def check_tool_choice(choice: str, tools: tuple[Tool, ...], param: str = "tool_choice") -> str:
    """`none`, `auto`, `required` or a tool's name, consistent with the tools given."""
    if choice not in ("none", "auto", "required") and choice not in {t.name for t in tools}:
        raise BadRequest(f"{param} names {choice!r}, which is not among the tools", param=param)
    if choice in ("auto", "required") and not tools:
        raise BadRequest(f"{param} '{choice}' needs tools", param=param)
    return choice


def json_constraint(schema: dict[str, Any] | None,
                    param: str = "response_format.json_schema.schema") -> Constraint:
    """Any JSON object (schema None) or JSON valid for `schema`, as the worker's constraint;
    a schema outside the enforced subset (mesh/wire/schema.py) is a 400 naming the keyword."""
    if schema is None:
        return Constraint(type="json_object")
    check_schema(schema, param=param)
    return Constraint(type="json_schema", json_schema=schema)
