"""Membership: what this node knows about every other node of the mesh.

The state is an immutable ``Membership`` changed only by the pure function
``apply(membership, event) -> membership`` (tested without I/O); ``View`` holds the
current one for the running node and replaces a ``trio.Event`` on every change, so
callers (router, status, tests) await changes instead of polling.

Liveness comes from gossip, not from connections or mDNS: a peer is ``alive`` while its
NodeState keeps arriving. Rules, with ``TICK`` = the gossip period (1 s, mesh/p2p/gossip.py):

- A state newer than the last one (higher ``seq``) makes the peer alive and refreshes
  ``last_seen``; an older or repeated one changes nothing while the peer is alive (a late
  relay is not news). A suspect peer takes any state: a node restarted with its clock
  set back sends lower seqs, and must not be ignored until they catch up.
- Unseen for 3 of the peer's own heartbeat periods (``suspect_after``: ``SUSPECT_AFTER``
  = 3 ticks while it announces the 1 s tick; large meshes pace their gossip and announce
  a longer ``period``, mesh/p2p/gossip.py): ``suspect``, out of routing (design brief).
- Losing the last connection to a peer makes it suspect at once: it cannot be routed to
  until it is back, which the next state shows (a restarted node's ``seq`` continues,
  see gossip).
- Unseen for ``DROP_AFTER`` = 30 s (or 10 of the peer's periods, if longer) and not
  connected: dropped from the view.
- RTT: an exponentially weighted mean of the ``/mesh/ping/1`` round trips
  (``RTT_ALPHA`` = 0.3 weights the newest sample; a ping every 2 s settles in ~5 pings).

Clocks: decisions use the monotonic clock (``now``); wall time is kept for display.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

import trio

from mesh.wire.state import NodeState

__all__ = [
    "TICK", "SUSPECT_AFTER", "DROP_AFTER", "RTT_ALPHA", "Status", "Peer", "Membership",
    "StateSeen", "RttMeasured", "Connected", "Disconnected", "Tick", "Event", "apply", "suspect_after",
    "drop_after", "status_node", "View",
]

TICK = 1.0
SUSPECT_AFTER = 3 * TICK
DROP_AFTER = 30.0
RTT_ALPHA = 0.3

Status = Literal["alive", "suspect"]


def suspect_after(state: NodeState) -> float:
    """Seconds unheard before a peer that sent ``state`` is suspect: 3 of its periods."""
    return SUSPECT_AFTER * max(1.0, state.period / TICK)


def drop_after(state: NodeState) -> float:
    return max(DROP_AFTER, 10 * state.period)


@dataclass(frozen=True)
class Peer:
    peer_id: str
    state: NodeState
    status: Status
    last_seen: float            # monotonic seconds
    last_seen_wall: float       # time.time() of the same moment
    connected: bool = False
    rtt_ms: float | None = None

    @property
    def name(self) -> str:
        return self.state.name or self.peer_id[-8:]

    @property
    def routable(self) -> bool:
        return self.status == "alive"


def _frozen(d: dict[str, Peer] | None = None) -> Mapping[str, Peer]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Membership:
    peers: Mapping[str, Peer] = field(default_factory=_frozen)
    connected: frozenset[str] = frozenset()


# ------------------------------------------------------------------- events
@dataclass(frozen=True)
class StateSeen:
    peer_id: str
    state: NodeState
    now: float
    wall: float


@dataclass(frozen=True)
class RttMeasured:
    peer_id: str
    rtt_ms: float


@dataclass(frozen=True)
class Connected:
    peer_id: str


@dataclass(frozen=True)
class Disconnected:
    peer_id: str


@dataclass(frozen=True)
class Tick:
    now: float


Event = StateSeen | RttMeasured | Connected | Disconnected | Tick


def _with(m: Membership, peer: Peer) -> Membership:
    peers = dict(m.peers)
    peers[peer.peer_id] = peer
    return replace(m, peers=_frozen(peers))


def apply(m: Membership, ev: Event) -> Membership:
    """The membership after ``ev``; returns ``m`` itself when nothing changed."""
    if isinstance(ev, StateSeen):
        old = m.peers.get(ev.peer_id)
        if old is not None and ev.state.seq <= old.state.seq and old.status == "alive":
            return m
        return _with(m, Peer(
            peer_id=ev.peer_id, state=ev.state, status="alive", last_seen=ev.now,
            last_seen_wall=ev.wall, connected=ev.peer_id in m.connected,
            rtt_ms=old.rtt_ms if old else None,
        ))
    if isinstance(ev, RttMeasured):
        old = m.peers.get(ev.peer_id)
        if old is None or not math.isfinite(ev.rtt_ms) or ev.rtt_ms < 0:
            return m
        rtt = ev.rtt_ms if old.rtt_ms is None else (1 - RTT_ALPHA) * old.rtt_ms + RTT_ALPHA * ev.rtt_ms
        return _with(m, replace(old, rtt_ms=rtt))
    if isinstance(ev, Connected):
        if ev.peer_id in m.connected:
            return m
        m = replace(m, connected=m.connected | {ev.peer_id})
        old = m.peers.get(ev.peer_id)
        return _with(m, replace(old, connected=True)) if old else m
    if isinstance(ev, Disconnected):
        if ev.peer_id not in m.connected:
            return m
        m = replace(m, connected=m.connected - {ev.peer_id})
        old = m.peers.get(ev.peer_id)
        return _with(m, replace(old, connected=False, status="suspect")) if old else m
    if isinstance(ev, Tick):
        changed = False
        peers: dict[str, Peer] = {}
        for pid, p in m.peers.items():
            age = ev.now - p.last_seen
            if age > drop_after(p.state) and not p.connected:
                changed = True
                continue
            if age > suspect_after(p.state) and p.status == "alive":
                p = replace(p, status="suspect")
                changed = True
            peers[pid] = p
        return replace(m, peers=_frozen(peers)) if changed else m
    raise TypeError(f"not a view event: {ev!r}")


def status_node(p: Peer) -> dict[str, Any]:
    """A peer as JSON for ``/mesh/status`` and ``mesh status``."""
    s = p.state
    return {
        "id": p.peer_id, "name": p.name, "version": s.version, "api": s.api_url, "addrs": list(s.addrs),
        "state": p.status, "last_seen": p.last_seen_wall, "connected": p.connected,
        "rtt_ms": None if p.rtt_ms is None else round(p.rtt_ms, 2),
        # the prefix hashes as a count: what a person reads is how many are cached
        "models": [{**m.model_dump(exclude={"prefixes"}), "prefixes": len(m.prefixes)}
                   for m in s.models],
        "memory": {"ram_total": s.ram_total, "ram_free": s.ram_free,
                   "vram_total": s.vram_total, "vram_free": s.vram_free},
        "rpc": s.rpc.model_dump(), "load": s.load, "open": s.open,
    }


class View:
    """The live membership of a running node.

    ``changed`` is a trio.Event set at the next change (then replaced by a new one):
    ``await view.changed.wait()`` or, with a predicate, ``await view.wait_for(pred, timeout)``.
    """

    def __init__(self) -> None:
        self._m = Membership()
        self._changed = trio.Event()

    @property
    def membership(self) -> Membership:
        return self._m

    @property
    def changed(self) -> trio.Event:
        return self._changed

    def apply(self, ev: Event) -> None:
        new = apply(self._m, ev)
        if new is not self._m:
            self._m = new
            self._changed.set()
            self._changed = trio.Event()

    def get(self, peer_id: str) -> Peer | None:
        return self._m.peers.get(peer_id)

    def peers(self) -> list[Peer]:
        return sorted(self._m.peers.values(), key=lambda p: (p.name, p.peer_id))

    def routable(self) -> list[Peer]:
        """Peers the router may send work to: alive (recent state) and not disconnected."""
        return [p for p in self.peers() if p.routable]

    def status_nodes(self) -> list[dict[str, Any]]:
        """Every peer as a ``/mesh/status`` node entry (the shape of the node's own entry)."""
        return [status_node(p) for p in self.peers()]

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._m.peers

    def __len__(self) -> int:
        return len(self._m.peers)

    async def wait_for(self, predicate: Callable[[View], bool], timeout: float) -> bool:
        """Wait until ``predicate(view)`` holds; False if it did not within ``timeout`` s."""
        with trio.move_on_after(timeout):
            while not predicate(self):
                await self._changed.wait()
            return True
        return predicate(self)
