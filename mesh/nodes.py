"""Every node this mesh ever admitted, and the ones revoked: `<home>/nodes.json`.

The shared token admits any machine that holds it; a lost laptop keeps it. A revocation
names a peer id (the Ed25519 identity in that machine's home). Limit: the machine keeps
the token, so with a fresh home (a new identity) it could join again; closing that
needs the token itself rotated, which is not built yet (issue 14). Records merge like API keys (mesh/keys.py): one per peer id, the
higher `rev` wins (then the later `updated`, then the node id that wrote it), so every
node converges on the same book whichever order gossip arrives in. Revocations travel in
each node's gossiped state (`NodeState.extra["nodes"]`: only revoked records, a few
bytes each); sightings (first/last seen, name) are local, written at most every
SEEN_FLUSH_S.

A revoked peer is refused at admission (mesh/p2p/admission.py) and its connections are
closed on every node as soon as the record reaches it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict

from mesh.errors import BadRequest, Conflict, NotFound

__all__ = ["NodeRecord", "NodeBook"]

FILE = "nodes.json"
SEEN_FLUSH_S = 30.0


class NodeRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    peer_id: str
    name: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    revoked: bool = False
    rev: int = 0
    updated: float = 0.0
    updated_by: str = ""

    def order(self) -> tuple:
        return (self.rev, self.updated, self.updated_by)

    def public(self) -> dict[str, Any]:
        return self.model_dump()


class NodeBook:
    def __init__(self, home: Path, node_id: str = "") -> None:
        self.path = home / FILE
        self.node_id = node_id
        self.records: dict[str, NodeRecord] = {}
        self._flushed = 0.0
        if self.path.exists():
            for raw in json.loads(self.path.read_text()):
                rec = NodeRecord.model_validate(raw)
                self.records[rec.peer_id] = rec

    # ------------------------------------------------------------ reading
    def listing(self) -> list[dict[str, Any]]:
        return [r.public() for r in sorted(self.records.values(), key=lambda r: r.first_seen)]

    def revoked(self) -> set[str]:
        return {p for p, r in self.records.items() if r.revoked}

    def first_seen(self, peer_id: str) -> float | None:
        """When this node first saw the peer (None: never)."""
        rec = self.records.get(peer_id)
        return rec.first_seen if rec else None

    def wire(self) -> list[dict[str, Any]]:
        """What this node gossips: the revocations (sightings stay local)."""
        return [r.model_dump(include={"peer_id", "name", "revoked", "rev", "updated",
                                      "updated_by"})
                for r in self.records.values() if r.revoked]

    def find(self, ref: str) -> NodeRecord:
        """A node by peer id, by its last 8+ characters, or by name (unique)."""
        hits = [r for r in self.records.values()
                if r.peer_id == ref or (len(ref) >= 8 and r.peer_id.endswith(ref))
                or r.name == ref]
        if not hits:
            raise NotFound(f"no node {ref!r} was ever admitted to this mesh",
                           code="node_not_found")
        if len(hits) > 1:
            raise BadRequest(f"{ref!r} names {len(hits)} nodes; give the peer id",
                             param="node", code="ambiguous")
        return hits[0]

    # ------------------------------------------------------------ writing
    def seen(self, peer_id: str, name: str) -> None:
        now = time.time()
        old = self.records.get(peer_id)
        if old is None:
            self.records[peer_id] = NodeRecord(peer_id=peer_id, name=name, first_seen=now,
                                               last_seen=now)
            self._save()
            return
        self.records[peer_id] = old.model_copy(update={"last_seen": now,
                                                       "name": name or old.name})
        if now - self._flushed > SEEN_FLUSH_S:
            self._save()

    def revoke(self, ref: str) -> NodeRecord:
        rec = self.find(ref)
        if rec.peer_id == self.node_id:
            raise Conflict("a node cannot revoke itself; revoke it from another node",
                           code="self_revoke")
        if rec.revoked:
            return rec
        new = rec.model_copy(update={"revoked": True, "rev": rec.rev + 1,
                                     "updated": time.time(), "updated_by": self.node_id})
        self.records[rec.peer_id] = new
        self._save()
        return new

    def merge(self, records: Iterable[dict[str, Any]]) -> bool:
        """Fold in revocations gossiped by a peer; True when anything changed."""
        changed = False
        for raw in records:
            rec = NodeRecord.model_validate(raw)
            old = self.records.get(rec.peer_id)
            if old is None or rec.order() > old.order():
                keep = {"first_seen": old.first_seen, "last_seen": old.last_seen} if old else {}
                self.records[rec.peer_id] = rec.model_copy(update=keep)
                changed = True
        if changed:
            self._save()
        return changed

    def _save(self) -> None:
        self._flushed = time.time()
        tmp = self.path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump([r.model_dump() for r in self.records.values()], f)
        os.replace(tmp, self.path)
