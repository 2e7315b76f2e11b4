"""Where a request for a model goes.

Policy (docs/architecture.md, "Routing", has the full version):
1. A request already proxied to us is served here or fails: never a second hop.
2. The local node, when it has the model loaded and is not saturated (in-flight below
   its slots, or no peer can take it).
3. Otherwise the best routable peer that has it loaded: the one with the lowest
   expected wait, where wait = (busy + queued + our in-flight to it) / slots, then the
   higher recent decode speed, then the lower RTT.
4. Nobody has it: ModelNotFound listing what the mesh does serve.

The API asks the router; it never looks at workers or peers itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from mesh.errors import ModelNotFound
from node.workers import Worker, WorkerPool


class PeerDirectory(Protocol):
    """What the router needs from the mesh layer (mesh/peers.py provides it)."""

    def candidates(self, model: str) -> list["PeerCandidate"]: ...
    def model_cards(self) -> list[dict[str, Any]]: ...


@dataclass
class PeerCandidate:
    peer_id: str
    name: str
    model: str
    slots: int
    busy: int
    queued: int
    tokens_per_s: float
    rtt_ms: float


@dataclass
class Route:
    model: str
    local: Worker | None = None
    peers: tuple[PeerCandidate, ...] = ()   # ordered fallbacks when not local


class Router:
    def __init__(self, pool: WorkerPool, peers: PeerDirectory | None = None) -> None:
        self.pool = pool
        self.peers = peers
        self.in_flight_to: dict[str, int] = {}
        self.created = int(time.time())

    def route(self, model: str, *, proxied: bool = False) -> Route:
        local = self.pool.find(model)
        if local is not None and local.state in ("loading", "loaded"):
            if proxied or self.peers is None:
                return Route(model=local.id, local=local)
            slots = int(local.info.get("slots") or 1)
            remote = self._rank(self.peers.candidates(local.id))
            if local.in_flight < slots or not remote:
                return Route(model=local.id, local=local)
            mine = local.in_flight / slots
            if all(self._wait(p) >= mine for p in remote):
                return Route(model=local.id, local=local)
            return Route(model=local.id, peers=tuple(remote))
        if not proxied and self.peers is not None:
            remote = self._rank(self.peers.candidates(model))
            if remote:
                return Route(model=remote[0].model, peers=tuple(remote))
        raise ModelNotFound(
            f"The model '{model}' does not exist or is not loaded on any node. "
            f"Available: {', '.join(sorted(c['id'] for c in self.model_cards())) or 'none'}",
            param="model")

    def _wait(self, p: PeerCandidate) -> float:
        return (p.busy + p.queued + self.in_flight_to.get(p.peer_id, 0)) / max(p.slots, 1)

    def _rank(self, cands: list[PeerCandidate]) -> list[PeerCandidate]:
        return sorted(cands, key=lambda p: (self._wait(p), -p.tokens_per_s, p.rtt_ms))

    def model_cards(self) -> list[dict[str, Any]]:
        cards: dict[str, dict[str, Any]] = {}
        for w in self.pool.workers.values():
            if w.state in ("loading", "loaded"):
                cards[w.id] = {"id": w.id, "object": "model", "created": int(w.started_at),
                               "owned_by": "inference-mesh"}
        if self.peers is not None:
            for card in self.peers.model_cards():
                cards.setdefault(card["id"], card)
        return sorted(cards.values(), key=lambda c: c["id"])
