"""Typed, versioned gossip messages and their signed envelope.

A node's whole advertised state is one ``NodeState`` (frozen, strict pydantic model),
packed with msgpack and sealed in an envelope::

    envelope = msgpack([ENVELOPE_VERSION, KIND_NODE_STATE, body, mac])
    body     = msgpack(NodeState.model_dump())
    mac      = HMAC-SHA256(hmac_key, b"mesh/state/1" || version || kind || body)

The MAC proves the sender holds the mesh token (gossipsub's own signature only proves who
the sender is, not that it belongs to this mesh). The domain-separation prefix keeps a
gossip MAC from ever being valid as an admission-handshake MAC, which uses the same key.

Versioning: ``ENVELOPE_VERSION`` changes only when the envelope layout changes; it is
checked before anything else. ``NodeState.v`` is the schema major version: a receiver
rejects a major it does not know. Minor additions need no bump: models ignore unknown
fields, and new fields get defaults, so an older node reads a newer node's state (and
``extra`` carries experimental data without a schema change).

Strict mode: no silent coercion ("3" is not 3), except that an int is accepted where a
float is expected (msgpack writes 2.0 as a float, but Python producers hand us ints).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh.errors import BadMessage

__all__ = [
    "ENVELOPE_VERSION", "NODE_STATE_VERSION", "MAX_ENVELOPE_BYTES", "BadMessage",
    "RpcState", "ModelState", "NodeState", "seal", "open_sealed", "pack", "unpack",
]

ENVELOPE_VERSION = 1
NODE_STATE_VERSION = 1
KIND_NODE_STATE = 1
_MAC_DOMAIN = b"mesh/state/1"
_MAC_BYTES = 32
# A state with ~100 models is ~20 KB; gossipsub's own inbound RPC cap is 1 MiB.
MAX_ENVELOPE_BYTES = 256 * 1024


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")


class RpcState(_Wire):
    """llama.cpp RPC capacity this node lends to splits (bytes)."""

    offered: int = Field(0, ge=0)
    free: int = Field(0, ge=0)
    used_by: str = ""                            # peer id of the node whose model it holds
    isolation: str = ""                          # "netns" | "none: <why>" (node/isolation.py)


class ModelState(_Wire):
    id: str
    backend: str = "llama"                      # llama | whisper | ...
    state: str = "loaded"                        # installed | loading | loaded | failed
    ctx: int = Field(0, ge=0)
    slots: int = Field(0, ge=0)
    busy: int = Field(0, ge=0)
    queued: int = Field(0, ge=0)
    tokens_per_s: float = Field(0.0, ge=0)
    wait_s: float = Field(0.0, ge=0)             # expected wait for a slot now (batching.py wait_s)
    aliases: list[str] = Field(default_factory=list)
    split: dict[str, Any] | None = None          # {nodes, layers, tensor_split, failure} (node/splits.py)
    # what it serves (mesh/wire/inference.py capabilities_of); empty: not told, the
    # backend's defaults apply
    capabilities: list[str] = Field(default_factory=list)
    # hashes of the prompt prefixes its slots hold (mesh/prefix.py): prefix-affine routing
    prefixes: list[int] = Field(default_factory=list)


class NodeState(_Wire):
    """Everything a node advertises, once per tick and on change."""

    v: Literal[1] = 1                            # NODE_STATE_VERSION
    node_id: str = ""                            # libp2p peer id; stamped by the gossip layer
    name: str = ""
    version: str = ""                            # inference-mesh version
    api_url: str = ""
    addrs: list[str] = Field(default_factory=list)   # full multiaddrs incl /p2p/<id>
    seq: int = Field(0, ge=0)                    # grows per message (stamped by gossip)
    ts: float = 0.0                              # sender's wall clock, seconds since epoch
    # s between two of the sender's heartbeats (mesh/p2p/gossip.py Pacer, stamped by
    # gossip); receivers suspect it after 3 periods. Older senders send none: 1 s.
    period: float = Field(1.0, gt=0, le=3600)
    ram_total: int = Field(0, ge=0)
    ram_free: int = Field(0, ge=0)
    vram_total: int = Field(0, ge=0)
    vram_free: int = Field(0, ge=0)
    rpc: RpcState = Field(default_factory=lambda: RpcState())
    models: list[ModelState] = Field(default_factory=list)
    load: float = 0.0                            # e.g. 1-minute load average / cores
    open: bool = False                           # no API keys and listening beyond loopback
    # API key records (mesh/keys.py): hashes, never secrets. Sent when the ring changed,
    # to new peers and every 30 s (mesh/p2p/gossip.py KeyCarry); empty means "not sent
    # this time", never "no keys" (merging is monotonic).
    keys: list[dict[str, Any]] = Field(default_factory=list)
    # during a token rotation's grace period: HMAC(new token's hmac key, peer id) in hex,
    # the proof that the sender holds the new token (mesh/token.py MeshSecrets.proof)
    rekey: str = Field("", max_length=64)
    extra: dict[str, Any] = Field(default_factory=dict)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Any:
    if len(data) > max_bytes:
        raise BadMessage(f"message of {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of ValueError subclasses
        raise BadMessage(f"not msgpack: {exc}") from exc


def _mac(key: bytes, version: int, kind: int, body: bytes) -> bytes:
    msg = _MAC_DOMAIN + version.to_bytes(2, "big") + kind.to_bytes(2, "big") + body
    return hmac.new(key, msg, hashlib.sha256).digest()


def seal(state: NodeState, hmac_key: bytes) -> bytes:
    """Pack and sign a NodeState for gossip."""
    body = pack(state.model_dump(mode="python"))
    return pack([ENVELOPE_VERSION, KIND_NODE_STATE, body, _mac(hmac_key, ENVELOPE_VERSION, KIND_NODE_STATE, body)])


def open_sealed(data: bytes, hmac_key: bytes | Sequence[bytes]) -> NodeState:
    """Check and unpack a sealed NodeState (signed with ``hmac_key``, or any of a list of
    keys: a token rotation's grace period); raises BadMessage on any defect."""
    env = unpack(data)
    if not isinstance(env, list) or len(env) != 4:
        raise BadMessage("not a mesh envelope")
    version, kind, body, mac = env
    if version != ENVELOPE_VERSION:
        raise BadMessage(f"unsupported envelope version {version!r} (this node reads {ENVELOPE_VERSION})")
    if kind != KIND_NODE_STATE:
        raise BadMessage(f"unknown message kind {kind!r}")
    if not isinstance(body, bytes) or not isinstance(mac, bytes) or len(mac) != _MAC_BYTES:
        raise BadMessage("malformed envelope")
    keys = [hmac_key] if isinstance(hmac_key, bytes) else hmac_key
    if not any(hmac.compare_digest(mac, _mac(k, version, kind, body)) for k in keys):
        raise BadMessage("bad HMAC: not signed with this mesh's token")
    fields = unpack(body)
    if not isinstance(fields, dict):
        raise BadMessage("node state is not a map")
    if fields.get("v") != NODE_STATE_VERSION:
        raise BadMessage(f"unsupported node state version {fields.get('v')!r}")
    try:
        return NodeState.model_validate(fields)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise BadMessage(f"invalid node state: {'.'.join(map(str, e['loc']))}: {e['msg']}") from exc
