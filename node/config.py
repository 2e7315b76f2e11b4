"""The node's configuration: one typed object, from flags > environment > file > defaults.

| setting          | flag              | env                 | default                          |
|------------------|-------------------|---------------------|----------------------------------|
| home             | --home            | MESH_HOME           | platformdirs user data dir       |
| host             | --host            | MESH_HOST           | 127.0.0.1                        |
| port             | --port            | MESH_PORT           | 8080 (0 = any free port)         |
| models           | --model (repeat)  | MESH_MODELS (comma) | the gallery's defaults           |
| no_models        | --no-models       | MESH_NO_MODELS      | false                            |
| models_dir       | --models-dir      | MESH_MODELS_DIR     | <home>/models                    |
| name             | --name            | MESH_NAME           | the hostname                     |
| token            | --token           | MESH_TOKEN          | none (single node, no mesh)      |
| p2p_port         | --p2p-port        | MESH_P2P_PORT       | 0 (any free port)                |
| peers            | --peer (repeat)   | MESH_PEERS (comma)  | none                             |
| mdns             | --no-mdns         | MESH_MDNS           | true                             |
| max_body_mb      | --max-body-mb     | MESH_MAX_BODY_MB    | 25 (OpenAI's audio limit)        |
| max_queue        | --max-queue       | MESH_MAX_QUEUE      | 64 requests per model, 503 past  |
| max_tokens_limit |                   | MESH_MAX_TOKENS     | 0 (no cap beyond the context)    |
| request_timeout  |                   | MESH_REQUEST_TIMEOUT| 600 s                            |
| queue_timeout    |                   | MESH_QUEUE_TIMEOUT  | 30 s a generation may wait for a slot, then 503 + Retry-After (0 = no bound) |
| affinity         |                   | MESH_AFFINITY       | true: a prompt goes to the node whose slots hold its start, when load is even (mesh/prefix.py) |
| max_concurrent_per_key |             | MESH_MAX_CONCURRENT_PER_KEY | 16 (0 = no cap)         |
| gallery          | --gallery (repeat)| MESH_GALLERY (comma)| none beyond the built-in index   |
| offer_memory     | --offer-memory    | MESH_OFFER_MEMORY   | 0 (lend nothing to RPC splits)   |
| rpc_threads      |                   | MESH_RPC_THREADS    | 0 (all cores): threads of the RPC server lent, and of split models loaded here |
| memory_limit     |                   | MESH_MEMORY_LIMIT   | 0 (none): the most RAM split placement counts as this node's (`1GiB`, ...) |
| bulk_port        |                   | MESH_BULK_PORT      | 0 (any free port): TCP port of the bulk side channel (model files, RPC), on `host`; -1: none, bytes stay on libp2p |
| response_retention_days |            | MESH_RESPONSE_RETENTION_DAYS | 30: stored Responses API objects kept, then deleted |
| batch_max_active |                  | MESH_BATCH_MAX_ACTIVE | 4 batches in progress per API key (0 = no cap) |
| batch_max_lines  |                  | MESH_BATCH_MAX_LINES | 50,000 lines per batch (OpenAI's limit) |
| mcp_servers      |                  | MESH_MCP_SERVERS (JSON) | none: MCP servers agents may start here, {name: {command, args, env, cwd}} (docs/agents.md) |
| agent_read_dirs  |                  | MESH_AGENT_READ_DIRS (comma) | none: folders agents' read_file may be allowed within |
| agent_http_prefixes |               | MESH_AGENT_HTTP_PREFIXES (comma) | none: URL prefixes agents' http_get may be allowed within |

Uploaded files (`/v1/files`) are capped by max_body_mb, like every request body.

`<home>/config.yaml`, when present, may set any of these keys.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mesh.errors import BadRequest

DEFAULT_MODELS = ["smollm2-135m-instruct", "whisper-tiny.en"]


class McpServer(BaseModel):
    """An MCP server agents may start on this node (over stdio), by name."""
    model_config = ConfigDict(extra="forbid")
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None


class NodeConfig(BaseModel):
    home: Path
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    no_models: bool = False
    models_dir: Path | None = None
    name: str = Field(default_factory=socket.gethostname)
    token: str | None = Field(default=None, repr=False)
    p2p_port: int = Field(0, ge=0, le=65535)
    peers: list[str] = Field(default_factory=list)
    mdns: bool = True
    max_body_mb: float = Field(25, gt=0)
    max_queue: int = Field(64, ge=1)
    max_tokens_limit: int = Field(0, ge=0)
    request_timeout: float = Field(600, gt=0)
    queue_timeout: float = Field(30, ge=0)
    affinity: bool = True
    max_concurrent_per_key: int = Field(16, ge=0)
    gallery: list[str] = Field(default_factory=list)
    offer_memory: int = Field(0, ge=0)
    rpc_threads: int = Field(0, ge=0)
    memory_limit: int = Field(0, ge=0)
    bulk_port: int = Field(0, ge=-1, le=65535)
    response_retention_days: float = Field(30, gt=0)
    batch_max_active: int = Field(4, ge=0)
    batch_max_lines: int = Field(50_000, ge=1)
    mcp_servers: dict[str, McpServer] = Field(default_factory=dict)
    agent_read_dirs: list[str] = Field(default_factory=list)
    agent_http_prefixes: list[str] = Field(default_factory=list)

    @field_validator("mcp_servers", mode="before")
    @classmethod
    def _json(cls, v: Any) -> Any:
        """MESH_MCP_SERVERS holds JSON; config.yaml a mapping."""
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from exc
        return v

    @field_validator("agent_read_dirs", "agent_http_prefixes", mode="before")
    @classmethod
    def _comma(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("agent_read_dirs")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        for d in v:
            if not Path(d).is_absolute():
                raise ValueError(f"{d!r} is not an absolute folder")
        return v

    @field_validator("agent_http_prefixes")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith(("http://", "https://")):
                raise ValueError(f"{p!r} is not an http(s) URL prefix")
        return v

    @field_validator("offer_memory", "memory_limit", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        """`6GiB`, `512MB`, `1e9` from the environment or config.yaml (flags are parsed by
        the CLI)."""
        if isinstance(v, str):
            text = v.strip().lower().replace(" ", "")
            num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
            unit = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2,
                    "mb": 1000**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3,
                    "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}.get(text[len(num):])
            try:
                return int(float(num) * unit) if unit else v
            except ValueError:
                return v
        return v

    @field_validator("models", "peers", "gallery", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.home / "models"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


_ENV = {
    "host": "MESH_HOST", "port": "MESH_PORT", "models": "MESH_MODELS", "no_models": "MESH_NO_MODELS",
    "models_dir": "MESH_MODELS_DIR", "name": "MESH_NAME", "token": "MESH_TOKEN",
    "p2p_port": "MESH_P2P_PORT", "peers": "MESH_PEERS", "mdns": "MESH_MDNS",
    "max_body_mb": "MESH_MAX_BODY_MB", "max_queue": "MESH_MAX_QUEUE",
    "max_tokens_limit": "MESH_MAX_TOKENS", "request_timeout": "MESH_REQUEST_TIMEOUT",
    "queue_timeout": "MESH_QUEUE_TIMEOUT", "affinity": "MESH_AFFINITY",
    "max_concurrent_per_key": "MESH_MAX_CONCURRENT_PER_KEY",
    "gallery": "MESH_GALLERY", "offer_memory": "MESH_OFFER_MEMORY", "rpc_threads": "MESH_RPC_THREADS",
    "memory_limit": "MESH_MEMORY_LIMIT", "bulk_port": "MESH_BULK_PORT",
    "response_retention_days": "MESH_RESPONSE_RETENTION_DAYS",
    "batch_max_active": "MESH_BATCH_MAX_ACTIVE", "batch_max_lines": "MESH_BATCH_MAX_LINES",
    "mcp_servers": "MESH_MCP_SERVERS", "agent_read_dirs": "MESH_AGENT_READ_DIRS",
    "agent_http_prefixes": "MESH_AGENT_HTTP_PREFIXES",
}


def default_home() -> Path:
    env = os.environ.get("MESH_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("inference-mesh"))


def load_config(home: Path | None = None, **flags: Any) -> NodeConfig:
    """Merge defaults < <home>/config.yaml < environment < flags (None means unset)."""
    home = Path(home).expanduser() if home else default_home()
    data: dict[str, Any] = {}
    cfg_file = home / "config.yaml"
    if cfg_file.exists():
        try:
            loaded = yaml.safe_load(cfg_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BadRequest(f"{cfg_file}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise BadRequest(f"{cfg_file}: expected a mapping of settings")
        data.update(loaded)
    for key, var in _ENV.items():
        if var in os.environ:
            val: Any = os.environ[var]
            if key in ("no_models", "mdns"):
                val = val.lower() in ("1", "true", "yes", "on")
            data[key] = val
    data.update({k: v for k, v in flags.items() if v is not None and v != ()})
    data["home"] = home
    try:
        return NodeConfig(**data)
    except Exception as exc:  # pydantic.ValidationError: one readable line
        errs = getattr(exc, "errors", lambda: [])()
        if errs:
            e = errs[0]
            raise BadRequest(f"bad setting {'.'.join(map(str, e['loc']))}: {e['msg']}") from exc
        raise BadRequest(str(exc)) from exc
