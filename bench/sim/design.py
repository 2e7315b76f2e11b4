"""The two designs the simulator compares, as settings of the same code.

    v1       the gossip layer as it stood before issue 19 (commit 6b2d488): a full state
             every second and on change (<= 4/s), the key ring in every message, py-libp2p's
             IHAVE fanout (max(6, a quarter of the non-mesh peers)) and its replay of the
             3-heartbeat message cache to every new peer. The Pacer with an infinite budget
             is exactly that old loop (a tick TICK after the last message, a change at
             least MIN_INTERVAL after it); stamping is the old four fields.
    current  mesh/p2p/gossip.py as it is: the real ``Publisher`` (``Pacer`` with
             ``MESH_RATE``, ``KeyCarry``), ``DEGREE``, ``GOSSIP_PEERS``, own-message replay.

Receivers run the real mesh/view.py in both: a v1 state announces no period (1 s).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from libp2p.pubsub.gossipsub import GossipSub

from mesh.p2p import gossip
from mesh.p2p.gossip import Pacer, Publisher
from mesh.wire.state import NodeState

__all__ = ["Design", "DESIGNS", "design"]


@dataclass(frozen=True)
class Design:
    name: str
    budget: float                      # Pacer budget, messages/s for the whole mesh
    degree: tuple[int, int, int]       # gossipsub D, D_low, D_high
    gossip_peers: Callable[[int], int]  # IHAVE targets per heartbeat, of n non-mesh peers
    replay: str                        # "window": the message cache; "own": our latest only
    real_publisher: bool               # stamp with mesh/p2p/gossip.py Publisher
    gossip_window: int = 3             # heartbeats of message ids an IHAVE lists (py-libp2p default)
    rate_limit: float = gossip.RATE_LIMIT

    def publisher(self, *, state: Callable[[], NodeState], node_id: str, addrs: list[str],
                  mesh_size: Callable[[], int], hmac_key: bytes, rng: random.Random) -> Any:
        pacer = Pacer(self.budget, rng)
        if self.real_publisher:
            return Publisher(None, hmac_key=hmac_key, state=state, node_id=node_id, addrs=lambda: addrs,
                             mesh_size=mesh_size, pacer=pacer)
        return _V1Stamp(state, node_id, addrs, pacer)

    def with_budget(self, budget: float) -> "Design":
        return replace(self, name=f"{self.name}@{budget:g}", budget=budget)


class _V1Stamp:
    """The old Publisher (commit 6b2d488): four fields stamped, keys always, every change
    after MIN_INTERVAL. (Its loop had no jitter; the Pacer's is kept here: it only moves
    heartbeats earlier, never later.)"""

    def __init__(self, state: Callable[[], NodeState], node_id: str, addrs: list[str], pacer: Pacer) -> None:
        self._state, self._node_id, self._addrs, self.pacer = state, node_id, addrs, pacer
        self._seq = time.time_ns() // 1_000_000

    def kicked(self) -> None:
        self.pacer.kick()

    def stamped(self, now: float) -> NodeState:
        self._seq += 1
        return self._state().model_copy(update={
            "node_id": self._node_id, "addrs": self._addrs, "seq": self._seq, "ts": time.time()})


def _ihave_fanout(router_class: type) -> Callable[[int], int]:
    """The IHAVE fanout as py-libp2p (or our subclass) computes it, from a router that is
    built with our settings but never started."""
    r = router_class(protocols=[gossip.PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12,
                     heartbeat_interval=1, adaptive_gossip_enabled=False)
    return lambda n: r._get_adaptive_gossip_peers_count(gossip.TOPIC, n)


DESIGNS = {
    "v1": Design("v1", budget=math.inf, degree=(6, 4, 12), gossip_peers=_ihave_fanout(GossipSub),
                 replay="window", real_publisher=False),
    "current": Design("current", budget=gossip.MESH_RATE, degree=gossip.DEGREE,
                      gossip_peers=_ihave_fanout(gossip._StateRouter), replay="own", real_publisher=True),
}


def design(name: str) -> Design:
    """``v1``, ``current``, or ``current@BUDGET`` (another mesh-wide rate)."""
    base, _, budget = name.partition("@")
    d = DESIGNS[base]
    return d.with_budget(float(budget)) if budget else d
