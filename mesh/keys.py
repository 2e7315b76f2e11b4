"""API keys: created on any node, valid on every node, revoked everywhere.

A key is `mk-<key_id>-<secret>` (key_id: 8 random bytes hex, secret: 32 random bytes
base64url). Nodes store and gossip only a `KeyRecord`: name, key_id, features, a
per-key random salt and HMAC-SHA256(salt, secret). The secret itself is shown once, to
the one who created it, and is never written, logged or sent anywhere.

Replication: every node's gossiped state carries its whole key ring (records are ~200
bytes; the gossip envelope is HMAC-signed with the mesh token, so only mesh members can
add keys). `merge` keeps, per key_id, the record with the highest (rev, updated,
updated_by); a revocation is the same record with `revoked=True` and rev+1, so it wins
over the live record on every node and can never be undone by an older copy. The ring is
persisted (0600) on every change, so a restart loses neither keys nor revocations.

Locking out: the first key must include `admin`, and the last live admin key cannot be
revoked while other live keys exist, so the owner keeps a way in. While the ring has no
live key, the node is open (key management then only from loopback).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from collections import defaultdict
from typing import Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from mesh.errors import BadRequest, Conflict, NotFound

FEATURES = ("chat", "completions", "embeddings", "audio", "models", "batch", "agents", "admin")
FILE = "keys.json"


class KeyRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    key_id: str
    name: str
    features: list[str]
    salt: str                      # hex
    hash: str                      # hex HMAC-SHA256(salt, secret)
    created: float
    rev: int = Field(1, ge=1)
    revoked: bool = False
    updated: float = 0.0
    updated_by: str = ""

    def order(self) -> tuple:
        return (self.rev, self.updated, self.updated_by)

    def grants(self, feature: str) -> bool:
        return "admin" in self.features or feature in self.features

    def public(self, last_used: float | None = None) -> dict:
        """What `mesh keys list` shows: never the salt or hash."""
        return {"name": self.name, "key_id": self.key_id, "features": list(self.features),
                "created": self.created, "last_used": last_used, "revoked": self.revoked}


def _digest(salt: bytes, secret: str) -> str:
    return hmac.new(salt, secret.encode(), hashlib.sha256).hexdigest()


def parse_features(features: Iterable[str]) -> list[str]:
    out: list[str] = []
    for f in features:
        f = f.strip().lower()
        if not f:
            continue
        if f not in FEATURES:
            raise BadRequest(f"unknown feature {f!r}; known: {', '.join(FEATURES)}",
                             param="features")
        if f not in out:
            out.append(f)
    if not out:
        raise BadRequest(f"a key needs at least one feature of {', '.join(FEATURES)}",
                         param="features")
    return out


class KeyRing:
    """The mesh's API keys as this node knows them."""

    def __init__(self, home: Path, node_id: str = "") -> None:
        self.path = home / FILE
        self.node_id = node_id
        self.records: dict[str, KeyRecord] = {}
        self.last_used: dict[str, float] = {}
        self.version = 0                      # bumps on every change (gossip republishes)
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.records = {r["key_id"]: KeyRecord.model_validate(r) for r in data["keys"]}
            except (ValueError, KeyError, TypeError) as exc:
                raise BadRequest(f"{self.path}: unreadable key ring ({exc}); fix or remove it") from exc

    # ------------------------------------------------------------- queries
    def live(self) -> list[KeyRecord]:
        return [r for r in self.records.values() if not r.revoked]

    @property
    def enforcing(self) -> bool:
        return bool(self.live())

    def verify(self, presented: str | None) -> KeyRecord | None:
        """The live record for a presented key, or None (unknown, malformed, revoked)."""
        if not presented or not presented.startswith("mk-"):
            return None
        try:
            _, key_id, secret = presented.split("-", 2)
        except ValueError:
            return None
        rec = self.records.get(key_id)
        if rec is None or rec.revoked:
            return None
        if not hmac.compare_digest(rec.hash, _digest(bytes.fromhex(rec.salt), secret)):
            return None
        self.last_used[key_id] = time.time()
        return rec

    def listing(self) -> list[dict]:
        return [r.public(self.last_used.get(r.key_id))
                for r in sorted(self.records.values(), key=lambda r: r.created)]

    # ------------------------------------------------------------- changes
    def create(self, name: str, features: Iterable[str]) -> tuple[KeyRecord, str]:
        name = name.strip()
        if not name or len(name) > 64:
            raise BadRequest("a key needs a name of 1 to 64 characters", param="name")
        feats = parse_features(features)
        if any(r.name == name for r in self.live()):
            raise Conflict(f"a live key named {name!r} exists; revoke it or pick another name",
                           code="key_exists")
        if not self.live() and "admin" not in feats:
            raise BadRequest("the first key must include the 'admin' feature, or nobody could "
                             "manage keys once the mesh requires them", param="features",
                             code="first_key_not_admin")
        key_id = secrets.token_hex(8)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        salt = secrets.token_bytes(16)
        now = time.time()
        rec = KeyRecord(key_id=key_id, name=name, features=feats, salt=salt.hex(),
                        hash=_digest(salt, secret), created=now, updated=now,
                        updated_by=self.node_id)
        self.records[key_id] = rec
        self._changed()
        return rec, f"mk-{key_id}-{secret}"

    def revoke(self, name: str, *, force: bool = False) -> list[KeyRecord]:
        """Revoke a key mesh-wide. Revoking the last live key would silently reopen the
        mesh to anyone: refused (Conflict, last_key) unless `force`."""
        targets = [r for r in self.live() if r.name == name or r.key_id == name]
        if not targets:
            raise NotFound(f"no live key named {name!r}", code="key_not_found")
        left = [r for r in self.live() if r not in targets]
        if not left and not force:
            raise Conflict(f"{name!r} is the mesh's last live key: revoking it opens the mesh "
                           "to anyone who can reach a node; pass force to do it anyway",
                           code="last_key")
        if left and not any("admin" in r.features for r in left):
            raise Conflict(f"revoking {name!r} would leave the mesh with keys but no admin key; "
                           "create another admin key first", code="last_admin_key")
        now = time.time()
        out = []
        for r in targets:
            new = r.model_copy(update={"revoked": True, "rev": r.rev + 1, "updated": now,
                                       "updated_by": self.node_id})
            self.records[r.key_id] = new
            out.append(new)
        self._changed()
        return out

    def merge(self, records: Iterable[KeyRecord | dict]) -> bool:
        """Fold in records gossiped by a peer; True when anything changed."""
        changed = False
        for r in records:
            rec = r if isinstance(r, KeyRecord) else KeyRecord.model_validate(r)
            mine = self.records.get(rec.key_id)
            if mine is None or rec.order() > mine.order():
                self.records[rec.key_id] = rec
                changed = True
        if changed:
            self._changed()
        return changed

    def wire(self) -> list[dict]:
        return [r.model_dump() for r in self.records.values()]

    def _changed(self) -> None:
        self.version += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": self.wire()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class InFlight:
    """Requests in progress per API key on this node, whether they came over HTTP
    (api/auth.py) or from a peer (mesh/proxy.py): the per-key concurrency cap holds on the
    node that serves, not only on the node a client talks to. cap 0: no cap."""

    def __init__(self, cap: int = 0) -> None:
        self.cap = cap
        self.active: dict[str, int] = defaultdict(int)

    def full(self, key_id: str | None) -> bool:
        return bool(self.cap and key_id) and self.active[key_id] >= self.cap

    @contextlib.contextmanager
    def hold(self, key_id: str | None) -> Iterator[None]:
        if key_id is None:
            yield
            return
        self.active[key_id] += 1
        try:
            yield
        finally:
            self.active[key_id] -= 1
            if not self.active[key_id]:
                del self.active[key_id]
