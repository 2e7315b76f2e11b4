"""What an agent is: its definition (`AgentSpec`), the replicated record that carries it
(`AgentRecord`, merged by revision as API keys are), and when its schedule fires.

An agent is a name, a model (any the mesh serves), instructions, the tools it may use
(allow-lists, all of them: MCP servers the node configures and the tools of each it may
call; URL prefixes for `http_get`; folders for `read_file`; other agents it may call),
limits, and optionally a schedule (a job: the agent plus a trigger, cron or interval;
the webhook trigger, `POST /v1/agents/{name}/runs`, needs no definition).
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, Iterable, Literal
from urllib.parse import urlsplit

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh.errors import BadRequest

__all__ = ["AgentSpec", "AgentRecord", "Limits", "Schedule", "parse_spec", "merge", "digest",
           "next_tick", "url_within", "NAME"]

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# The names the built-in tools take in the model's tool list (an MCP tool may not reuse one)
BUILTINS = ("http_get", "read_file", "call_agent")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class McpUse(_Spec):
    """Tools of one MCP server (a name in the node's `mcp_servers`); `tools` is the
    allow-list (None: every tool the server lists)."""
    server: str = Field(min_length=1)
    tools: list[str] | None = Field(None, min_length=1)


def _http_prefix(p: str) -> str:
    u = urlsplit(p)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{p!r} is not an http(s) URL prefix like https://example.com/docs/")
    return p


class HttpGetTool(_Spec):
    allow: list[str] = Field(min_length=1)      # URL prefixes

    @field_validator("allow")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        return [_http_prefix(p) for p in v]


class ReadFileTool(_Spec):
    allow: list[str] = Field(min_length=1)      # absolute folders

    @field_validator("allow")
    @classmethod
    def _dirs(cls, v: list[str]) -> list[str]:
        for d in v:
            if not PurePosixPath(d).is_absolute():
                raise ValueError(f"{d!r} is not an absolute folder")
        return v


class Tools(_Spec):
    mcp: list[McpUse] = Field(default_factory=list)
    http_get: HttpGetTool | None = None
    read_file: ReadFileTool | None = None
    agents: list[str] = Field(default_factory=list)     # agents it may call


class Limits(_Spec):
    max_steps: int = Field(8, ge=1, le=64)          # model calls; the last one gets no tools
    max_tokens: int = Field(2048, ge=1)             # completion tokens over the whole run
    deadline_s: float = Field(300, gt=0, le=86400)  # wall-clock seconds for the whole run


class Schedule(_Spec):
    """A job's trigger: `every` seconds (from the agent's creation) or a `cron` expression
    (UTC; 5 fields, or 6 with seconds last), each tick run with `input`."""
    every: float | None = Field(None, ge=1)
    cron: str | None = None
    input: str = ""

    @model_validator(mode="after")
    def _one(self) -> "Schedule":
        if (self.every is None) == (self.cron is None):
            raise ValueError("a schedule has either 'every' (seconds) or 'cron'")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise ValueError(f"{self.cron!r} is not a cron expression")
        return self


class AgentSpec(_Spec):
    name: str
    model: str = Field(min_length=1)
    description: str = ""
    instructions: str = ""
    tools: Tools = Field(default_factory=Tools)
    # "required": the first model step must call a tool; later steps are "auto" (as the
    # OpenAI Agents SDK's reset_tool_choice), so a run cannot loop on forced calls
    tool_choice: Literal["auto", "required"] = "auto"
    temperature: float | None = Field(None, ge=0, le=2)
    limits: Limits = Field(default_factory=Limits)
    schedule: Schedule | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError("a name is 1-63 characters of a-z, 0-9, '-' and '_', "
                             "starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _tools(self) -> "AgentSpec":
        servers = [m.server for m in self.tools.mcp]
        if len(set(servers)) != len(servers):
            raise ValueError("tools.mcp names a server twice")
        for other in self.tools.agents:
            if not NAME.match(other):
                raise ValueError(f"tools.agents: {other!r} is not an agent name")
        return self


def parse_spec(data: Any) -> AgentSpec:
    """A definition from JSON/YAML; a bad one is one BadRequest naming the field."""
    if not isinstance(data, dict):
        raise BadRequest("an agent definition is a mapping (name, model, instructions, ...)")
    try:
        return AgentSpec.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        what = {"missing": "is required", "extra_forbidden": "is not a field of an agent"}
        msg = what.get(e["type"], e["msg"].removeprefix("Value error, "))
        raise BadRequest(f"{loc or 'agent'}: {msg}", param=loc or None,
                         code="invalid_value") from exc


class AgentRecord(BaseModel):
    """A definition as it replicates: the spec plus who owns it and its revision."""
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    spec: dict[str, Any] | None          # AgentSpec as JSON; None once deleted
    owner: dict[str, Any] | None = None  # the creating key: {name, key_id, features}
    created: float
    rev: int = Field(1, ge=1)
    updated: float = 0.0
    updated_by: str = ""
    deleted: bool = False

    def order(self) -> tuple:
        return (self.rev, self.updated, self.updated_by)

    @property
    def agent(self) -> AgentSpec:
        return AgentSpec.model_validate(self.spec)


def merge(mine: dict[str, AgentRecord], theirs: Iterable[dict | AgentRecord]) -> list[str]:
    """Fold records into `mine` (in place): per name the highest (rev, updated, updated_by)
    wins, so a deletion (a tombstone with rev + 1) beats every older copy. The names that
    changed."""
    changed = []
    for r in theirs:
        rec = r if isinstance(r, AgentRecord) else AgentRecord.model_validate(r)
        if not NAME.match(rec.name):
            continue
        old = mine.get(rec.name)
        if old is None or rec.order() > old.order():
            mine[rec.name] = rec
            changed.append(rec.name)
    return changed


def digest(records: Iterable[AgentRecord]) -> str:
    """A short fingerprint of a set of records: equal sets gossip equal digests."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.name):
        h.update(f"{r.name}\0{r.rev}\0{r.updated!r}\0{r.updated_by}\n".encode())
    return h.hexdigest()[:16]


def next_tick(schedule: Schedule, anchor: float, after: float) -> float:
    """The first tick strictly after `after` (epoch seconds). Interval ticks are
    anchor + k * every, so every node computes the same instants."""
    if schedule.every is not None:
        k = math.floor((after - anchor) / schedule.every) + 1
        t = anchor + max(k, 0) * schedule.every
        return t if t > after else t + schedule.every
    start = datetime.fromtimestamp(after, timezone.utc)
    return float(croniter(schedule.cron, start).get_next(float))


def url_within(url: str, prefixes: Iterable[str]) -> bool:
    """Does `url` lie under one of `prefixes`? Compared parsed (scheme, host, port, then a
    path prefix), so `https://ok.example@evil/` or `https://ok.example.evil/` never pass."""
    try:
        u = urlsplit(url)
        port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:
        return False
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
        return False
    path = u.path or "/"
    if "/../" in path + "/" or "/./" in path + "/" or re.search("%2[ef]", path, re.I):
        return False            # dot segments, encoded or not, could climb out of a prefix
    for p in prefixes:
        q = urlsplit(p)
        qport = q.port or {"http": 80, "https": 443}.get(q.scheme)
        if (u.scheme, u.hostname, port) == (q.scheme, q.hostname, qport) and \
                path.startswith(q.path or "/"):
            return True
    return False
