"""The router's view of the mesh: which peers serve a model, and how busy they are.

Reads the membership (mesh/view.py), which holds each peer's latest gossiped NodeState;
only peers that are `alive` (heard within 3 ticks) are offered for routing.
"""

from __future__ import annotations

from typing import Any

from mesh.router import PeerCandidate
from mesh.wire.inference import capabilities_of


class MeshPeers:
    def __init__(self, view) -> None:
        self.view = view

    def candidates(self, model: str) -> list[PeerCandidate]:
        out = []
        for p in self.view.routable():
            for m in p.state.models:
                if m.state == "loaded" and (m.id == model or model in m.aliases):
                    out.append(PeerCandidate(peer_id=p.peer_id, name=p.name, model=m.id,
                                             slots=max(m.slots, 1), busy=m.busy, queued=m.queued,
                                             tokens_per_s=m.tokens_per_s,
                                             rtt_ms=p.rtt_ms if p.rtt_ms is not None else 1e3,
                                             backend=m.backend, last_seen=p.last_seen))
        return out

    def model_cards(self) -> list[dict[str, Any]]:
        cards = []
        for p in self.view.routable():
            for m in p.state.models:
                if m.state == "loaded":
                    cards.append({"id": m.id, "object": "model", "created": int(p.state.ts),
                                  "owned_by": "inference-mesh",
                                  "capabilities": m.capabilities or capabilities_of(m.backend)})
        return cards
