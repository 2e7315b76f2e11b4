"""One virtual node: the product's own state, view, router and key ring on simulated time.

What runs here is the project's code, called as the running node calls it:

    state      mesh/wire/state.py NodeState, built as node/services.py builds it, stamped
               by the design (bench/sim/design.py: the real Publisher, or the old rules)
    view       mesh/view.py View: StateSeen on each first delivery, Connected and
               Disconnected as links come and go, Tick every TICK_INTERVAL (0.5 s, as
               mesh/p2p/node.py)
    routing    mesh/router.py Router.plan over mesh/peers.py MeshPeers(view); the node
               itself is the router's LocalBackend (find, model_cards)
    keys       mesh/keys.py KeyRing: merge of every state that carries records (what
               node/daemon.py's _merge_gossiped_keys does), revoke

What is modelled: the worker (``slots`` generation slots and a FIFO queue; a request
holds a slot for an exponential time) and its stats poll (once per STATS_EVERY, a change
of busy/queued notifies the publisher, as node/workers.py does).
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.keys import KeyRing
from mesh.peers import MeshPeers
from mesh.router import PeerCandidate, Router
from mesh.view import View
from mesh.wire.state import ModelState, NodeState

__all__ = ["MODEL", "STATS_EVERY", "TICK_INTERVAL", "peer_id_for", "typical_state", "sample_keyring",
           "SimModel", "TwoChoices", "ROUTERS", "SimNode"]

MODEL = "smollm2-135m-instruct"
STATS_EVERY = 1.0          # s, node/workers.py polls its worker's figures once a second
TICK_INTERVAL = 0.5        # s, mesh/p2p/node.py ticks the view twice a second
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def peer_id_for(i: int) -> str:
    """A peer id shaped like an Ed25519 libp2p one (52 characters), fixed per index."""
    n = int.from_bytes(hashlib.sha256(b"sim-node-%d" % i).digest(), "big")
    out = []
    for _ in range(44):
        n, r = divmod(n, 58)
        out.append(_B58[r])
    return "12D3KooW" + "".join(out)


def typical_state(name: str, *, keys: list[dict[str, Any]] | None = None, slots: int = 4, busy: int = 0,
                  queued: int = 0, probe: int = 0) -> NodeState:
    """A NodeState with what a serving node gossips: one model, memory, four file hashes
    in ``extra`` (gallery/store.py advertisement) and the key ring."""
    h = hashlib.sha256(name.encode()).hexdigest()
    models = [ModelState(id=MODEL, backend="llama", state="loaded", ctx=8192, slots=slots, busy=busy,
                         queued=queued, tokens_per_s=42.0, aliases=["smollm2"],
                         capabilities=["chat", "completions", "embeddings"])] if slots else []
    extra: dict[str, Any] = {"files": [hashlib.sha256(f"{MODEL}-{i}".encode()).hexdigest() for i in range(4)]}
    if probe:
        extra["probe"] = probe
    return NodeState(name=name, version="0.1.0", api_url=f"http://10.{int(h[:2], 16)}.{int(h[2:4], 16)}.7:8080",
                     ram_total=64 << 30, ram_free=31 << 30, vram_total=0, vram_free=0, models=models,
                     load=0.25, open=False, keys=list(keys or []), extra=extra)


def sample_keyring(home: Path, count: int) -> KeyRing:
    """A key ring with ``count`` keys (the first an admin key, as mesh/keys.py requires)."""
    ring = KeyRing(home, node_id="sim")
    for i in range(count):
        ring.create(f"key-{i}", ["admin"] if i == 0 else ["chat", "embeddings"])
    return ring


@dataclass
class SimModel:
    """What the router reads of a local model (mesh/router.py LocalModel)."""

    id: str
    slots: int
    backend: str = "llama"
    state: str = "loaded"
    in_flight: int = 0
    background: int = 0     # the simulator sends no batch lines


class _NoTransport:
    """The router's PeerTransport: the simulator moves requests itself (bench/sim/sim.py)
    after ``Router.plan`` chose the target, so ``open`` is never called."""

    def open(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("the simulator routes with Router.plan, not Router.open")


@dataclass
class TwoChoices(Router):
    """The first proposal (``--router two-choices``): the first target is the better of
    two candidates drawn at random from all of them (the power of two choices,
    Mitzenmacher), the rest follow in the plain ranking's order as fallbacks, so
    ``capacity`` and retries are unchanged. The product (mesh/router.py, Herding) draws
    only among peers with a free slot that cost about the same."""

    def rank(self, model: str) -> list[PeerCandidate]:
        ranked = self.ranked(model)
        if len(ranked) > 2:
            a, b = self.rng.sample(range(len(ranked)), 2)
            ranked.insert(0, ranked.pop(min(a, b)))
        return ranked


ROUTERS = {"product": Router, "two-choices": TwoChoices}


class SimNode:
    def __init__(self, index: int, *, slots: int, observer: bool, ring: KeyRing | None,
                 router: str = "product", rng: random.Random | None = None) -> None:
        self.i = index
        self.peer_id = peer_id_for(index)
        self.name = f"n{index:04d}"
        self.up = False
        self.frozen = False
        self.observer = observer
        self.model = SimModel(MODEL, slots) if slots else None
        self.busy = 0
        self.waiting: deque[Any] = deque()
        self.stats = (0, 0)                 # (busy, queued) as the last stats poll saw them
        self.probe = 0                      # extra["probe"]: a tracked state change
        self.ring = ring
        self.view = View() if observer else None
        self.router: Router | None = None
        if observer:
            self.router = ROUTERS[router](local=self, peers=MeshPeers(self.view), transport=_NoTransport())
            if rng is not None:
                self.router.rng = rng
        self.publisher: Any = None          # set by the design (bench/sim/design.py)
        self._ring_wire: tuple[int, list[dict[str, Any]]] = (-1, [])
        self.fallback_keys: list[dict[str, Any]] = []   # a non-observer's (frozen) copy of the ring

    # the router's LocalBackend
    def find(self, model: str) -> SimModel | None:
        m = self.model
        return m if m is not None and (model == m.id or model == "smollm2") else None

    def model_cards(self) -> list[dict[str, Any]]:
        return []

    # what the node gossips (node/services.py node_state)
    def keys_wire(self) -> list[dict[str, Any]]:
        if self.ring is None:
            return self.fallback_keys
        if self._ring_wire[0] != self.ring.version:
            self._ring_wire = (self.ring.version, self.ring.wire())
        return self._ring_wire[1]

    def state(self) -> NodeState:
        busy, queued = self.stats
        return typical_state(self.name, keys=self.keys_wire(), slots=self.model.slots if self.model else 0,
                             busy=busy, queued=queued, probe=self.probe)

    def poll_stats(self) -> bool:
        """The worker's figures, as node/workers.py polls them; True when they changed."""
        now = (min(self.busy, self.model.slots), len(self.waiting)) if self.model else (0, 0)
        changed = now != self.stats
        self.stats = now
        return changed
