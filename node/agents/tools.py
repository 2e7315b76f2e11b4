"""The tools one run may call: MCP servers' tools (started over stdio for the run) and the
built-ins (`http_get`, `read_file`, `call_agent`), each behind two allow-lists.

The agent's definition says what it may use; the node's configuration says what agents
may use on this node at all (`mcp_servers`, `agent_read_dirs`, `agent_http_prefixes`):
definitions replicate mesh-wide from any key with the `agents` feature, so a node never
starts a command, reads a folder or fetches a URL its own operator did not allow. A call
outside either list is refused: the refusal is the tool's result for the model (so it can
answer without it) and is recorded on the step with its reason.

MCP: each server the agent names is started (its `command` from the node's config) when
the run starts and stopped when it ends, so runs share no server state; its tools are
listed once (an allow-listed name the server lacks fails the run at its start) and their
parameter schemas are checked against the enforced subset (mesh/wire/schema.py), as a
client's function tools are. MCP SDK errors are translated at this boundary
(`_mcp_errors`) into a failed tool call, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import httpx
import trio

from mesh.errors import BadRequest, MeshError
from mesh.wire.inference import Tool
from mesh.wire.schema import check_schema
from node.agents.spec import BUILTINS, AgentSpec, url_within

__all__ = ["NodeTools", "ToolBox", "ToolResult", "open_toolbox", "capable", "MAX_OUTPUT"]

MAX_OUTPUT = 64 * 1024        # characters of a tool's result kept (the model's context is small)
HTTP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class NodeTools:
    """What this node lets agents use (node/config.py)."""
    mcp_servers: dict[str, Any] = field(default_factory=dict)    # name -> McpServer
    read_dirs: tuple[str, ...] = ()
    http_prefixes: tuple[str, ...] = ()

    def caps(self) -> dict[str, list[str]]:
        """What peers are told (gossip), to know which nodes can run an agent."""
        return {"mcp": sorted(self.mcp_servers), "dirs": list(self.read_dirs),
                "urls": list(self.http_prefixes)}


def _inside(path: str, roots: Iterable[str]) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(r) or PurePosixPath(r) in p.parents for r in roots)


def capable(spec: AgentSpec, caps: dict[str, Any],
            others: Callable[[str], AgentSpec | None], _seen: tuple[str, ...] = ()) -> str | None:
    """Why a node with `caps` (NodeTools.caps, as gossiped) cannot run `spec`; None if it
    can. Agents it calls run on the same node, so they count too."""
    t = spec.tools
    for use in t.mcp:
        if use.server not in caps.get("mcp", ()):
            return f"it needs MCP server {use.server!r}, which is not in the node's mcp_servers"
    if t.read_file:
        for d in t.read_file.allow:
            if not _inside(d, caps.get("dirs", ())):
                return f"its read_file folder {d} is not within the node's agent_read_dirs"
    if t.http_get:
        for p in t.http_get.allow:
            if not url_within(p, caps.get("urls", ())):
                return f"its http_get prefix {p} is not within the node's agent_http_prefixes"
    for name in t.agents:
        if name in _seen + (spec.name,):
            continue
        other = others(name)
        if other is None:
            return f"it calls agent {name!r}, which does not exist"
        why = capable(other, caps, others, _seen + (spec.name,))
        if why:
            return f"it calls agent {name!r}, and {why}"
    return None


@dataclass
class ToolResult:
    output: str                   # what the model reads
    error: str | None = None      # the call failed (or was refused): why
    refused: bool = False         # refused by an allow-list
    detail: dict[str, Any] = field(default_factory=dict)    # recorded, not shown to the model

    def record(self) -> dict[str, Any]:
        return {"output": self.output, "error": self.error, "refused": self.refused,
                **self.detail}


def _refuse(why: str) -> ToolResult:
    return ToolResult(output=f"refused: {why}", error=why, refused=True)


def _fail(why: str) -> ToolResult:
    return ToolResult(output=f"error: {why}", error=why)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_OUTPUT else text[:MAX_OUTPUT] + "\n[... cut]"


@contextlib.contextmanager
def _mcp_errors(server: str, doing: str):
    """The MCP SDK's errors (its own, anyio's, OSError, pydantic's, ExceptionGroups of
    them) as one MeshError naming the server: the SDK has no single root to catch."""
    try:
        yield
    except MeshError:
        raise
    except Exception as exc:       # noqa: BLE001 - see the docstring; Cancelled passes
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, BaseExceptionGroup):
            first = exc.exceptions[0]
            msg = str(first) or type(first).__name__
        raise MeshError(f"MCP server {server!r}: {doing} failed: {msg}",
                        code="mcp_error") from exc


@contextlib.contextmanager
def _collapse():
    """An exception group holding one exception, as that exception: the MCP SDK's anyio
    task groups wrap whatever crosses them (trio's strict exception groups), twice."""
    try:
        yield
    except BaseExceptionGroup as eg:
        leaf: BaseException = eg
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is eg:
            raise
        raise leaf


CallAgent = Callable[[str, str], Awaitable[ToolResult]]


class ToolBox:
    """The tools offered to one run's model, and their execution."""

    def __init__(self, spec: AgentSpec, node: NodeTools, call_agent: CallAgent) -> None:
        self.spec, self.node, self.call_agent = spec, node, call_agent
        self.offered: list[Tool] = []
        self._mcp: dict[str, tuple[str, Any]] = {}        # tool name -> (server, client)

    def _offer(self, tool: Tool, owner: str) -> None:
        if any(t.name == tool.name for t in self.offered):
            raise BadRequest(f"tool name {tool.name!r} is offered twice (the second by "
                             f"{owner}); an agent's tools need distinct names")
        self.offered.append(tool)

    async def call(self, name: str, arguments: str) -> ToolResult:
        if name not in {t.name for t in self.offered}:
            return _refuse(f"tool {name!r} is not on this agent's allow-list (its tools: "
                           f"{', '.join(t.name for t in self.offered) or 'none'})")
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            return _fail(f"the arguments are not JSON: {exc}")
        if not isinstance(args, dict):
            return _fail("the arguments must be a JSON object")
        if name in self._mcp:
            return await self._call_mcp(name, args)
        if name == "http_get":
            return await self._http_get(args.get("url"))
        if name == "read_file":
            return await self._read_file(args.get("path"))
        return await self._call_agent(args.get("agent"), args.get("input"))

    # ------------------------------------------------------------------ MCP
    async def _call_mcp(self, name: str, args: dict[str, Any]) -> ToolResult:
        server, client = self._mcp[name]
        try:
            with _mcp_errors(server, f"calling {name}"):
                res = await client.call_tool(name, args)
        except MeshError as exc:
            return _fail(exc.message)
        texts = [getattr(c, "text", None) for c in res.content]
        out = "\n".join(t for t in texts if t is not None)
        if not out and res.structured_content is not None:
            out = json.dumps(res.structured_content)
        skipped = sum(t is None for t in texts)
        if skipped:
            out += f"\n[{skipped} non-text content block(s) not shown]"
        detail = {"server": server}
        if res.is_error:
            return ToolResult(output=f"error: {_clip(out)}", error=_clip(out) or "tool error",
                              detail=detail)
        return ToolResult(output=_clip(out), detail=detail)

    # ------------------------------------------------------------- built-ins
    async def _http_get(self, url: Any) -> ToolResult:
        if not isinstance(url, str) or not url:
            return _fail("http_get needs a 'url' string")
        allow = self.spec.tools.http_get.allow
        if not url_within(url, allow):
            return _refuse(f"{url} is not on this agent's allow-list of URL prefixes "
                           f"({', '.join(allow)})")
        if not url_within(url, self.node.http_prefixes):
            return _refuse(f"{url} is not within this node's agent_http_prefixes")
        try:
            async with httpx.AsyncClient(follow_redirects=False, timeout=HTTP_TIMEOUT_S) as c:
                async with c.stream("GET", url) as r:
                    body = b""
                    async for chunk in r.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_OUTPUT:
                            break
        except httpx.HTTPError as exc:
            return _fail(f"GET {url} failed: {exc or type(exc).__name__}")
        ctype = r.headers.get("content-type", "")
        detail = {"status": r.status_code, "content_type": ctype}
        if r.is_redirect:
            return ToolResult(output=f"HTTP {r.status_code}, redirect to "
                              f"{r.headers.get('location')} (not followed)", detail=detail)
        textual = not ctype or ctype.startswith("text/") or "json" in ctype or "xml" in ctype
        text = (_clip(body.decode(r.encoding or "utf-8", errors="replace")) if textual else
                f"[{len(body)} bytes of {ctype}, not shown]")
        if r.status_code >= 400:
            return ToolResult(output=f"HTTP {r.status_code}: {text[:2000]}",
                              error=f"HTTP {r.status_code}", detail=detail)
        return ToolResult(output=text, detail=detail)

    async def _read_file(self, path: Any) -> ToolResult:
        if not isinstance(path, str) or not path:
            return _fail("read_file needs a 'path' string")
        allow = self.spec.tools.read_file.allow
        p = Path(path) if Path(path).is_absolute() else Path(allow[0]) / path
        try:
            real = await trio.to_thread.run_sync(p.resolve, True)    # links followed
        except (OSError, RuntimeError):
            return _fail(f"{path}: no such file")
        resolved = [str(Path(d).resolve()) for d in allow]
        if not _inside(str(real), resolved):
            return _refuse(f"{path} is not in this agent's folders ({', '.join(allow)})")
        if not _inside(str(real), [str(Path(d).resolve()) for d in self.node.read_dirs]):
            return _refuse(f"{path} is not within this node's agent_read_dirs")
        try:
            data = await trio.to_thread.run_sync(_read_head, real)
        except IsADirectoryError:
            names = await trio.to_thread.run_sync(_listing, real)
            return ToolResult(output=f"{path} is a folder; its files: {', '.join(names) or 'none'}",
                              detail={"path": str(real)})
        except OSError as exc:
            return _fail(f"{path}: {exc.strerror or exc}")
        if b"\0" in data:
            return _fail(f"{path} is not a text file")
        return ToolResult(output=_clip(data.decode("utf-8", errors="replace")),
                          detail={"path": str(real)})

    async def _call_agent(self, agent: Any, text: Any) -> ToolResult:
        if agent not in self.spec.tools.agents:
            return _refuse(f"agent {agent!r} is not among the agents this one may call "
                           f"({', '.join(self.spec.tools.agents)})")
        if not isinstance(text, str):
            return _fail("call_agent needs an 'input' string")
        return await self.call_agent(agent, text)


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(MAX_OUTPUT + 1)


def _listing(path: Path, most: int = 200) -> list[str]:
    """A folder's entries (sub-folders end with /), for a model that asked for a folder."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:most]


def _builtins(spec: AgentSpec) -> list[Tool]:
    t = spec.tools
    out = []
    if t.http_get:
        out.append(Tool(name="http_get", description="Fetch a URL with HTTP GET and return "
                        f"its body. Allowed URL prefixes: {', '.join(t.http_get.allow)}",
                        parameters={"type": "object", "properties": {"url": {"type": "string"}},
                                    "required": ["url"]}))
    if t.read_file:
        out.append(Tool(name="read_file", description="Read a text file (a folder: its list of "
                        "files). Allowed folders: "
                        f"{', '.join(t.read_file.allow)}",
                        parameters={"type": "object", "properties": {"path": {"type": "string"}},
                                    "required": ["path"]}))
    if t.agents:
        out.append(Tool(name="call_agent", description="Ask another agent; returns its answer.",
                        parameters={"type": "object", "properties": {
                            "agent": {"enum": list(t.agents)}, "input": {"type": "string"}},
                            "required": ["agent", "input"]}))
    return out


@contextlib.asynccontextmanager
async def open_toolbox(spec: AgentSpec, node: NodeTools,
                       call_agent: CallAgent) -> AsyncIterator[ToolBox]:
    """The run's tools, its MCP servers started for as long as the block runs. What the
    block raises comes out as itself; a server that fails at start or breaks the session's
    teardown is a MeshError naming it."""
    # the SDK takes ~1.5 s to import: in a thread, once, when a run first needs it
    mcp = await trio.to_thread.run_sync(importlib.import_module, "mcp") if spec.tools.mcp else None
    box = ToolBox(spec, node, call_agent)
    for tool in _builtins(spec):
        box._offer(tool, "a built-in")
    in_block = False
    try:
        with _collapse():
            async with contextlib.AsyncExitStack() as stack:
                for use in spec.tools.mcp:
                    await _start_mcp(mcp, box, use, node, stack)
                in_block = True
                yield box
                in_block = False
    except MeshError:
        raise
    except Exception as exc:       # noqa: BLE001 - the SDK's teardown errors (see above)
        if in_block:
            raise
        raise MeshError(f"an MCP server of this run failed: {exc or type(exc).__name__}",
                        code="mcp_error") from exc


async def _start_mcp(mcp, box: ToolBox, use, node: NodeTools,
                     stack: contextlib.AsyncExitStack) -> None:
    conf = node.mcp_servers.get(use.server)
    if conf is None:
        raise BadRequest(f"MCP server {use.server!r} is not configured on this node "
                         "(mcp_servers)")
    params = mcp.StdioServerParameters(command=conf.command, args=list(conf.args),
                                   env=dict(conf.env) or None, cwd=conf.cwd)
    with _mcp_errors(use.server, "starting it"):
        client = await stack.enter_async_context(mcp.Client(params))
        listed = (await client.list_tools()).tools
    by_name = {t.name: t for t in listed}
    for name in use.tools if use.tools is not None else list(by_name):
        t = by_name.get(name)
        if t is None:
            raise BadRequest(f"MCP server {use.server!r} has no tool {name!r} (it has: "
                             f"{', '.join(by_name) or 'none'})")
        if name in BUILTINS:
            raise BadRequest(f"MCP server {use.server!r}'s tool {name!r} has the name of a "
                             "built-in tool")
        schema = t.input_schema or {"type": "object", "properties": {}}
        check_schema(schema, param=f"mcp {use.server}.{name}")
        box._offer(Tool(name=name, description=t.description or "", parameters=schema),
                   f"MCP server {use.server!r}")
        box._mcp[name] = (use.server, client)
