"""The simulated world: nodes, churn, request load, and what is measured.

One ``Sim`` is one run of a ``Scenario``. Nodes come up at t=0, each connected to every
other (mesh/p2p/node.py dials every member it hears of), and gossip builds its mesh at
the first heartbeats. After ``warmup`` s the counters start; the run ends at
``warmup + seconds``.

- Publishing: each node's publisher (bench/sim/design.py) is woken at ``pacer.due(n)``
  (n: the members it is connected to, itself included) and on every change (a stats poll
  that differs, a probe, a revocation, a thaw); it stamps and seals its state with the
  real code, and gossip (bench/sim/gossipsub.py) carries the bytes.
- Receiving: a first copy at an observer is a ``StateSeen`` for its real View; a state
  with key records is merged into its real KeyRing (a change is re-gossiped, as
  node/daemon.py does).
- Requests: Poisson arrivals at up observers; ``Router.plan`` (real) picks the target;
  the request travels, takes a slot or queues at the target's worker, holds the slot for
  an exponential ``service_s``. A frozen target answers nothing: after ACK_S (1.5 s,
  mesh/proxy.py) the origin marks it silent (``Router.silent_since``, as Router.open
  does) and tries the next target.
- Churn (mesh-wide Poisson, ``churn`` events per node per minute): a node leaves (its
  connections close: every observer applies Disconnected) and a fresh node (new id,
  empty view and key ring) joins ``rejoin_s`` later; or a node freezes (SIGSTOP: its
  connections stay up) for ``freeze_s``. At most ``max_down`` nodes are gone or frozen
  at once (``churn bounded``).
- Probes: every ``probe_every`` s a random up node changes its state (``extra.probe``)
  and notifies: "spread" is the time until 99% of the observers that were up then (and
  still are at the end) hold a state with it. Revocations: at 1/3 and 2/3 of the run an
  observer revokes a key; the time until 99% of observers' rings hold it revoked.
- False suspicions: an observer's view turning a peer ``suspect`` (by its Tick rule)
  while that peer is up and not frozen.

Scale: with more than ``all_observers_up_to`` (200) nodes only ``observers`` nodes (50
by default, chosen at random) run a view, a router and a key ring and originate
requests; every node gossips. Observers apply every state they get, so their figures are
exact; what is coarser is the request load (all from the observers) and the re-gossip
of merged keys (non-observers do not merge).
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.sim.calibrate import load as load_calibration
from bench.sim.design import Design, design
from bench.sim.engine import Loop
from bench.sim.gossipsub import Costs, Gossip, Msg
from bench.sim.net import Links
from bench.sim.node import MODEL, STATS_EVERY, TICK_INTERVAL, SimNode, sample_keyring
from mesh.errors import MeshError
from mesh.proxy import ACK_S
from mesh.view import Connected, Disconnected, RttMeasured, StateSeen, Tick
from mesh.wire.state import seal

__all__ = ["Scenario", "Sim", "run"]

HMAC_KEY = b"s" * 32
# A thawed node's first tick finds every peer unheard for the length of its freeze (the
# simulator drops what reached it while frozen; TCP would have kept it): its own
# suspicions in the next seconds say nothing about the mesh.
THAW_GRACE = 5.0
PING_NOISE = 0.0005        # s, mean scheduling noise of a ping round trip in a busy trio loop
PROBE_TAIL = 10.0          # s at the end of a run without new probes (they need time to spread)
GOSSIP_COUNTERS = ("dropped_queue", "not_relayed", "repaired", "first_copies", "duplicates")


@dataclass
class Scenario:
    nodes: int = 100
    seconds: float = 60.0            # measured, after the warmup
    warmup: float = 15.0
    design: str = "current"
    net: str = "lan"
    sites: int = 4
    loss: float = 0.01
    churn: float = 0.02              # events per node per minute (leave+rejoin, or freeze)
    max_down: float = 0.05           # fraction of nodes gone or frozen at once, at most
    freeze_s: float = 20.0
    rejoin_s: float = 5.0
    load: float = 0.7                # of the mesh's generation slots
    service_s: float = 4.0
    servers: float = 0.8             # fraction of nodes serving the model
    slots: int = 4
    keys: int = 5
    probe_every: float = 1.0
    observers: int = 50
    all_observers_up_to: int = 200
    router: str = "product"          # or "two-choices": a proposal (bench/sim/node.py TwoChoices)
    seed: int = 1


@dataclass
class _Probe:
    origin: int
    t: float
    eligible: set[int]
    got: dict[int, float] = field(default_factory=dict)


@dataclass
class _Freeze:
    node: int
    t: float
    eligible: set[int]
    got: dict[int, float] = field(default_factory=dict)


class Sim:
    def __init__(self, sc: Scenario, *, calibration: dict[str, Any] | None = None) -> None:
        self.sc = sc
        # one stream per concern, so that two designs run with one seed see the same
        # nodes, churn and requests (the gossip stream alone follows the design)
        seeds = random.Random(sc.seed)
        self.rng, self.rng_load, self.rng_churn, self.rng_nodes = (random.Random(seeds.random()) for _ in range(4))
        self.loop = Loop()
        self.design: Design = design(sc.design)
        self.links = Links(sc.net, rng=random.Random(seeds.random()), sites=sc.sites, loss=sc.loss)
        self.costs = Costs.from_calibration(calibration or load_calibration())
        total = sc.warmup + sc.seconds
        joins = int(3 * sc.churn * sc.nodes * total / 60) + 10
        self.cap = sc.nodes + joins
        self.gossip = Gossip(self, self.cap)
        self._home = Path(tempfile.mkdtemp(prefix="meshsim-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        seed_ring = sample_keyring(self._home / "seed", sc.keys)
        self.records = seed_ring.wire()
        self.key_ids = [r["key_id"] for r in self.records]
        every = sc.nodes <= sc.all_observers_up_to
        self._obs_idx = set(range(sc.nodes)) if every else set(self.rng_nodes.sample(range(sc.nodes), sc.observers))
        self._every = every
        self.nodes: list[SimNode] = []
        self.up_list: list[int] = []
        self._up_pos: dict[int, int] = {}
        self.by_peer: dict[str, int] = {}
        self.frozen_count = 0
        self.gone = 0
        # measurements
        self.measuring = False
        self.probes: list[_Probe] = []
        self.freezes: list[_Freeze] = []
        self.revocations: list[_Probe] = []
        self._revoked_key: dict[int, str] = {}
        self.joiner_keys: list[float] = []           # s for a joiner's ring to hold every key
        self._joined_at: dict[int, float] = {}
        self.false_suspicions = 0
        self.true_suspicions = 0
        self.req = {"total": 0, "local": 0, "remote": 0, "no_free_slot": 0, "to_frozen": 0, "failed": 0,
                    "wait_s": 0.0, "queued": 0,
                    "random_full": 0, "all_full": 0}
        self.deliveries = 0
        self.delivered_pairs: set[tuple[int, int]] | None = None   # tests switch this on
        self.churn_log: list[tuple[float, str, int, int]] = []       # (t, kind, node, nodes down)
        self.daemon_merge_records = 0                               # what node/daemon.py's loop would merge
        self.publishes = 0
        self._req_rate: float | None = None
        self._start: dict[str, Any] = {}

    # ------------------------------------------------------------ population
    @property
    def n_up(self) -> int:
        return len(self.up_list)

    @property
    def reachable(self) -> int:
        return len(self.up_list) - self.frozen_count

    def sample_up(self, k: int, exclude: set[int]) -> list[int]:
        k = min(k, len(self.up_list) - len(exclude & self._up_pos.keys()))
        if k <= 0:
            return []
        pick = self.rng.sample(self.up_list, min(len(self.up_list), k + len(exclude)))
        return [u for u in pick if u not in exclude][:k]

    def _new_node(self, observer: bool) -> SimNode:
        i = len(self.nodes)
        slots = self.sc.slots if self.rng_nodes.random() < self.sc.servers else 0
        ring = None
        if observer:
            from mesh.keys import KeyRing
            ring = KeyRing(self._home / f"n{i}", node_id=f"sim-{i}")
        node = SimNode(i, slots=slots, observer=observer, ring=ring, router=self.sc.router,
                       rng=random.Random(self.rng_load.random()))
        node.fallback_keys = self.records
        node.publisher = self.design.publisher(
            state=node.state, node_id=node.peer_id, addrs=[f"/ip4/10.0.0.1/tcp/4001/p2p/{node.peer_id}"],
            mesh_size=lambda: len(self.up_list), hmac_key=HMAC_KEY, rng=random.Random(self.rng_nodes.random()))
        node.wake_at = math.inf
        node.thawed_at = -math.inf
        self.nodes.append(node)
        self.by_peer[node.peer_id] = i
        return node

    def _bring_up(self, node: SimNode) -> None:
        node.up = True
        self._up_pos[node.i] = len(self.up_list)
        self.up_list.append(node.i)
        for j in self.up_list:
            other = self.nodes[j]
            if j == node.i:
                continue
            if other.observer:
                other.view.apply(Connected(node.peer_id))
            if node.observer:
                node.view.apply(Connected(other.peer_id))
        lp = self.loop
        hb_phase = self.rng_nodes.random()
        lp.after(0.1 + hb_phase, self._heartbeat, node.i)
        if node.model:
            lp.after(self.rng_nodes.random() * STATS_EVERY, self._stats, node.i)
        if node.observer:
            lp.after(self.rng_nodes.random() * TICK_INTERVAL, self._tick, node.i)
        # the first state goes out at once (Pacer.last is -inf); nodes of the initial
        # population start up over one heartbeat period, joiners at once
        first = 0.0 if self.measuring or self.loop.now > 0 else node.publisher.pacer.period(self.sc.nodes)
        self._wake(node.i, self.loop.now + first * self.rng_nodes.random())

    def _take_down(self, node: SimNode) -> None:
        node.up = False
        pos = self._up_pos.pop(node.i)
        last = self.up_list.pop()
        if last != node.i:
            self.up_list[pos] = last
            self._up_pos[last] = pos
        self.gossip.leave(node.i)
        for j in self.up_list:
            other = self.nodes[j]
            if other.observer:
                other.view.apply(Disconnected(node.peer_id))
        for req in list(node.waiting):
            self._req_done(req)
        node.waiting.clear()

    # ------------------------------------------------------------ publishing
    def _wake(self, v: int, t: float) -> None:
        node = self.nodes[v]
        if t < node.wake_at:
            node.wake_at = t
            self.loop.at(t, self._on_wake, v, t)

    def _on_wake(self, v: int, t: float) -> None:
        node = self.nodes[v]
        if t != node.wake_at or not node.up:
            return
        node.wake_at = math.inf
        if node.frozen:
            return                      # the thaw wakes it
        pacer = node.publisher.pacer
        n = self.n_up
        now = self.loop.now
        if now + 1e-9 >= pacer.due(n):
            state = node.publisher.stamped(now)
            data = seal(state, HMAC_KEY)
            self.gossip.publish(v, state, len(data))
            self.publishes += 1
            pacer.sent(now)
        self._wake(v, pacer.due(n))

    def notify(self, v: int) -> None:
        node = self.nodes[v]
        node.publisher.kicked()
        self._wake(v, max(self.loop.now, node.publisher.pacer.due(self.n_up)))

    def _heartbeat(self, v: int) -> None:
        node = self.nodes[v]
        if not node.up:
            return
        if not node.frozen:
            self.gossip.heartbeat(v)
        self.loop.after(1.0, self._heartbeat, v)

    def _stats(self, v: int) -> None:
        node = self.nodes[v]
        if not node.up:
            return
        if not node.frozen and node.poll_stats():
            self.notify(v)
        self.loop.after(STATS_EVERY, self._stats, v)

    # ------------------------------------------------------------ receiving
    def delivered(self, v: int, m: Msg) -> None:
        """A first copy of m is handed to node v's subscriber (gossip calls this)."""
        self.deliveries += 1
        if self.delivered_pairs is not None:
            pair = (v, m.id)
            assert pair not in self.delivered_pairs, f"node {v} got message {m.id} twice"
            self.delivered_pairs.add(pair)
        node = self.nodes[v]
        if not node.observer:
            return
        origin = self.nodes[m.origin]
        view, now, st = node.view, self.loop.now, m.state
        known = origin.peer_id in view
        before = view.get(origin.peer_id)
        view.apply(StateSeen(origin.peer_id, st, now, now))
        after = view.get(origin.peer_id)
        if after is before:
            return
        if not known:       # a /mesh/ping/1 sample: the wire, four frames of Python, noise
            rtt = self.links.rtt(v, m.origin) + 4 * self.costs.frame + self.rng_nodes.expovariate(1 / PING_NOISE)
            view.apply(RttMeasured(origin.peer_id, rtt * 1000))
        # what node/daemon.py's _merge_gossiped_keys walks on this change: the records of
        # the state that arrived (_fresh_states); before that fix, those of every peer
        # whose latest state carried keys (results made before it: bench/sim/results/README.md)
        if self.measuring and st.keys:
            self.daemon_merge_records += len(st.keys)
        if st.keys:
            self.gossip.background(v, self.costs.merge_per_record * len(st.keys))
            if node.ring.merge(st.keys):
                self.notify(v)
                self._check_ring(v)
        probe = st.extra.get("probe")
        if probe:
            p = self.probes[probe - 1]
            if v in p.eligible and v not in p.got and p.origin == m.origin:
                p.got[v] = now - p.t

    def _check_ring(self, v: int) -> None:
        ring = self.nodes[v].ring
        now = self.loop.now
        for k, r in enumerate(self.revocations):
            kid = self._revoked_key[k]
            if v in r.eligible and v not in r.got and ring.records.get(kid) is not None and ring.records[kid].revoked:
                r.got[v] = now - r.t
        if v in self._joined_at and len(ring.records) >= len(self.key_ids):
            self.joiner_keys.append(now - self._joined_at.pop(v))

    def _tick(self, v: int) -> None:
        node = self.nodes[v]
        if not node.up:
            return
        if not node.frozen:
            view = node.view
            before = view.membership
            view.apply(Tick(self.loop.now))
            after = view.membership
            if after is not before:
                for pid, p in after.peers.items():
                    if p.status != "suspect":
                        continue
                    old = before.peers.get(pid)
                    if old is None or old.status != "alive":
                        continue
                    self._suspected(v, self.by_peer[pid])
        self.loop.after(TICK_INTERVAL, self._tick, v)

    def _suspected(self, v: int, u: int) -> None:
        peer = self.nodes[u]
        if not self.measuring or self.loop.now - self.nodes[v].thawed_at < THAW_GRACE:
            return
        if peer.up and not peer.frozen:
            self.false_suspicions += 1
            return
        self.true_suspicions += 1
        for f in reversed(self.freezes):
            if f.node == u:
                if v in f.eligible and v not in f.got:
                    f.got[v] = self.loop.now - f.t
                break

    # ------------------------------------------------------------ requests
    def _next_request(self) -> None:
        if self._req_rate is None:
            servers = sum(1 for n in self.nodes if n.model)
            self._req_rate = self.sc.load * servers * self.sc.slots / self.sc.service_s
        self.loop.after(self.rng_load.expovariate(self._req_rate), self._next_request)
        if not self.measuring:
            return
        origins = [i for i in sorted(self._obs_idx) if self.nodes[i].up and not self.nodes[i].frozen]
        if not origins:
            return
        origin = self.nodes[self.rng_load.choice(origins)]
        try:
            targets = origin.router.plan(MODEL)
        except MeshError:        # ModelNotFound: the origin sees no server
            self.req["failed"] += 1
            return
        self.req["total"] += 1
        req = {"origin": origin.i, "targets": targets, "k": 0, "t": self.loop.now, "server": None,
               "service": self.rng_load.expovariate(1 / self.sc.service_s)}
        self._dispatch(req)

    def _dispatch(self, req: dict[str, Any]) -> None:
        origin = self.nodes[req["origin"]]
        if req["k"] >= len(req["targets"]):
            self.req["failed"] += 1
            return
        target = req["targets"][req["k"]]
        if target.peer is None:
            self.req["local"] += 1
            self._admit(origin.i, req)
            return
        self.req["remote"] += 1
        self._counterfactual()
        j = self.by_peer[target.peer.peer_id]
        router = origin.router
        pid = target.peer.peer_id
        router.in_flight_to[pid] = router.in_flight_to.get(pid, 0) + 1
        router.sent_at.setdefault(pid, []).append(self.loop.now)   # as Router._enter does
        req["peer"], req["sent"] = pid, self.loop.now
        self.loop.after(self.links.latency(origin.i, j), self._req_arrive, j, req)

    def _counterfactual(self) -> None:
        """For the same remote request: would a random server have been full, and was
        every server full (so that no policy could have found a free slot)?"""
        servers = [n for n in self.nodes if n.model and n.up and not n.frozen]
        if not servers:
            return
        pick = servers[self.rng_load.randrange(len(servers))]
        self.req["random_full"] += pick.busy >= pick.model.slots
        self.req["all_full"] += all(n.busy >= n.model.slots for n in servers)

    def _req_arrive(self, j: int, req: dict[str, Any]) -> None:
        server = self.nodes[j]
        if not server.up or server.frozen:
            self.req["to_frozen"] += 1
            self.loop.after(ACK_S, self._silent, req)
            return
        self._admit(j, req)

    def _silent(self, req: dict[str, Any]) -> None:
        origin = self.nodes[req["origin"]]
        peer = req.pop("peer")
        origin.router.silent_since[peer] = self.loop.now
        origin.router._release(peer, req.pop("sent"))
        req["k"] += 1
        if origin.up:
            self._dispatch(req)

    def _admit(self, j: int, req: dict[str, Any]) -> None:
        server = self.nodes[j]
        req["server"] = j
        req["arrived"] = self.loop.now
        if server.busy >= server.model.slots:
            if "peer" in req:
                self.req["no_free_slot"] += 1
            self.req["queued"] += 1
            server.waiting.append(req)
        else:
            self._start_service(server, req)
        server.model.in_flight = server.busy + len(server.waiting)

    def _start_service(self, server: SimNode, req: dict[str, Any]) -> None:
        server.busy += 1
        self.req["wait_s"] += self.loop.now - req["arrived"]
        self.loop.after(req["service"], self._finish, server.i, req)

    def _finish(self, j: int, req: dict[str, Any]) -> None:
        server = self.nodes[j]
        if not server.up:
            self._req_done(req)
            return
        server.busy -= 1
        self._req_done(req)
        if server.waiting and server.busy < server.model.slots:
            self._start_service(server, server.waiting.popleft())
        server.model.in_flight = server.busy + len(server.waiting)

    def _req_done(self, req: dict[str, Any]) -> None:
        """The request ended (served, or its server left): the origin's router forgets it."""
        peer = req.pop("peer", None)
        if peer is not None:
            self.nodes[req["origin"]].router._release(peer, req.pop("sent"))

    # ------------------------------------------------------------ churn
    def _churn(self) -> None:
        sc = self.sc
        rate = sc.churn * sc.nodes / 60
        if rate <= 0:
            return
        self.loop.after(self.rng_churn.expovariate(rate), self._churn)
        if self.gone + self.frozen_count >= max(1, int(sc.max_down * sc.nodes)):
            return
        candidates = sorted(i for i in self.up_list if not self.nodes[i].frozen)
        if len(candidates) < 2:
            return
        v = self.rng_churn.choice(candidates)
        node = self.nodes[v]
        if self.rng_churn.random() < 0.5:
            self.gone += 1
            self._take_down(node)
            self._log("leave", v)
            self.loop.after(sc.rejoin_s, self._join)
        else:
            node.frozen = True
            self.frozen_count += 1
            self._log("freeze", v)
            if self.measuring:
                self.freezes.append(_Freeze(v, self.loop.now, self._eligible_observers(exclude=v)))
            self.loop.after(sc.freeze_s, self._thaw, v)

    def _join(self) -> None:
        if len(self.nodes) >= self.cap:
            self.gone -= 1
            return
        node = self._new_node(observer=self._every)
        if node.observer:
            self._obs_idx.add(node.i)
            self._joined_at[node.i] = self.loop.now
        self.gone -= 1
        self._bring_up(node)
        self.gossip.join(node.i)
        self._log("join", node.i)

    def _thaw(self, v: int) -> None:
        node = self.nodes[v]
        node.frozen = False
        node.thawed_at = self.loop.now
        self.frozen_count -= 1
        self._log("thaw", v)
        if node.up:
            self.notify(v)

    def _log(self, kind: str, v: int) -> None:
        self.churn_log.append((self.loop.now, kind, v, self.gone + self.frozen_count))

    # ------------------------------------------------------------ probes
    def _eligible_observers(self, exclude: int) -> set[int]:
        return {i for i in self._obs_idx if i != exclude and self.nodes[i].up and not self.nodes[i].frozen}

    def _probe(self) -> None:
        self.loop.after(self.sc.probe_every, self._probe)
        if not self.measuring or self.loop.now > self.sc.warmup + self.sc.seconds - PROBE_TAIL:
            return
        cands = sorted(i for i in self.up_list if not self.nodes[i].frozen)
        v = self.rng_churn.choice(cands)
        self.probes.append(_Probe(v, self.loop.now, self._eligible_observers(exclude=v)))
        self.nodes[v].probe = len(self.probes)
        self.notify(v)

    def _revoke(self) -> None:
        cands = [i for i in self._obs_idx if self.nodes[i].up and not self.nodes[i].frozen]
        v = self.rng_churn.choice(sorted(cands))
        ring = self.nodes[v].ring
        live = [r for r in ring.live() if "admin" not in r.features]
        if not live:
            return
        rec = ring.revoke(live[0].key_id)[0]
        k = len(self.revocations)
        self._revoked_key[k] = rec.key_id
        self.revocations.append(_Probe(v, self.loop.now, self._eligible_observers(exclude=v)))
        self.notify(v)

    # ------------------------------------------------------------ run
    def _begin_measuring(self) -> None:
        self.measuring = True
        self._start = {"t": self.loop.now, "traffic": self.gossip.traffic.snapshot(),
                       "publishes": self.publishes, "deliveries": self.deliveries,
                       "gossip": {k: getattr(self.gossip, k) for k in GOSSIP_COUNTERS},
                       "up": list(self.up_list)}

    def start(self) -> None:
        """The initial population up, the load, churn, probes and revocations scheduled."""
        sc = self.sc
        for _ in range(sc.nodes):
            self._new_node(observer=len(self.nodes) in self._obs_idx)
        for node in self.nodes:
            if node.ring is not None:
                node.ring.merge(self.records)
            self._bring_up(node)
        lp = self.loop
        lp.after(0.0, self._next_request)
        lp.after(sc.warmup, self._begin_measuring)
        lp.after(sc.warmup + self.rng_churn.random(), self._churn)
        lp.after(sc.warmup, self._probe)
        for f in (1 / 3, 2 / 3):
            lp.after(sc.warmup + f * sc.seconds, self._revoke)

    def advance(self, until: float) -> None:
        self.loop.run(until)

    def join_now(self) -> int:
        """A fresh node joins now (tests); its index."""
        self.gone += 1
        self._join()
        return len(self.nodes) - 1

    def close(self) -> None:
        shutil.rmtree(self._home, ignore_errors=True)

    def run(self) -> dict[str, Any]:
        """The whole scenario; its figures (bench/sim/report.py)."""
        from bench.sim.report import summarize
        try:
            self.start()
            self.advance(self.sc.warmup + self.sc.seconds)
            return summarize(self)
        finally:
            self.close()


def run(sc: Scenario, **kw: Any) -> dict[str, Any]:
    return Sim(sc, **kw).run()
