"""GossipSub on one topic, as py-libp2p 0.8.1 runs it, reduced to what costs time or work.

Read from py-libp2p's source (libp2p/pubsub/gossipsub.py, pubsub.py, mcache.py,
rpc_queue.py, utils.py) and modelled, not run:

- Mesh: each node keeps ``D`` mesh peers among the peers it is connected to (every
  member: mesh/p2p/node.py dials everyone it hears of); at each heartbeat (1 s, its own
  phase) below ``D_low`` it grafts up to ``D``, above ``D_high`` it prunes to ``D``. A
  graft is accepted, so mesh links are symmetric. A node that leaves drops out of every
  mesh; a frozen one stays (its connections stay up: it is a black hole).
- Eager push: a first copy is validated, delivered to the subscriber, then sent to every
  mesh peer but the one it came from and the origin. Later copies are dropped by the
  seen cache (but cost their parse and peer-record check).
- Spam limit (``_check_spam_protection``): past ``rate_limit`` first deliveries per
  second from one forwarder, a message is still delivered but no longer relayed.
- IHAVE/IWANT: each heartbeat a node sends IHAVE with the ids of the messages it saw in
  the last ``gossip_window`` heartbeats to ``gossip_peers(non-mesh peers)`` random
  non-mesh peers; a peer that lacks one asks (IWANT) and gets it one round trip later,
  then relays it as a first copy. The ids are counted, not listed: only messages that
  some reachable node still lacks are checked one by one (at most ``REPAIR_MAX``).
- Replay to a new peer (``send_recent_messages``): "window" sends the whole message
  cache window to every new connection (py-libp2p), "own" only the sender's latest.
- Every RPC carries the sender's signed peer record, which the receiver verifies
  (``maybe_consume_signed_record``): the ``envelope`` cost is paid per copy.

CPU: each node is one FIFO server (the node's trio thread); every copy received costs
``recv`` (parse + peer record + seen + half the stream machinery), a first copy adds
``first`` (signature, two opens of the sealed state, the view's apply), every copy sent
``send``. The prices come from bench/sim/calibrate.py. A copy that finds more than
``QUEUE_S`` of work queued ahead of it is dropped (py-libp2p's 32-RPC queues overflow).
IHAVE, pings (every peer every 2 s, mesh/p2p/ping.py) and grafts are charged as
background work at each heartbeat.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesh.wire.state import NodeState

if TYPE_CHECKING:
    from bench.sim.sim import Sim

__all__ = ["Msg", "Gossip", "Costs", "Traffic", "QUEUE_S", "REPAIR_MAX"]

QUEUE_S = 1.0              # s of queued work past which an arriving copy is dropped
REPAIR_MAX = 200           # incomplete messages one heartbeat checks
PING_INTERVAL = 2.0        # mesh/p2p/ping.py
PING_BYTES = 8 + 12 + 18 + 2   # payload + yamux header + Noise tag and length + varint
CONTROL_BYTES = 60         # a GRAFT/PRUNE/IWANT RPC without its peer record


@dataclass(frozen=True)
class Costs:
    """CPU seconds per operation (bench/sim/calibrate.py)."""

    recv: float
    first: float
    send: float
    publish: float
    ihave_id: float
    frame: float               # one small frame read or written (a ping), no peer record
    merge_per_record: float
    apply_per_peer: float
    rpc_overhead: int          # bytes a state message adds to the sealed state (pubsub fields, peer record)
    ihave_per_id: int
    sender_record: int

    @classmethod
    def from_calibration(cls, cal: dict[str, Any]) -> "Costs":
        c, s = cal["costs_s"], cal["sizes_bytes"]
        half = c["residual"] / 2
        return cls(recv=c["parse"] + c["envelope"] + c["seen"] + half,
                   first=c["verify"] + 2 * c["open"] + c["apply_base"],
                   send=c["serialize"] + half, publish=c["sign"] + c["seal"], ihave_id=c["ihave_id"],
                   frame=half, merge_per_record=c["merge_per_record"], apply_per_peer=c["apply_per_peer"],
                   rpc_overhead=int(s["rpc_overhead"]) + 30, ihave_per_id=int(round(s["ihave_per_id"])),
                   sender_record=int(s["sender_record"]))


@dataclass(eq=False)
class Msg:
    id: int
    origin: int
    state: NodeState
    size: int                  # bytes on the wire per copy
    t: float                   # published at
    have: bytearray            # 1 where a node has it
    reachable: int             # nodes up and not frozen when it was published
    got: int = 1


@dataclass
class Traffic:
    """Per-node counters (lists indexed by node)."""

    cap: int
    msgs_in: list[int] = field(init=False)
    bytes_in: list[int] = field(init=False)
    msgs_out: list[int] = field(init=False)
    bytes_out: list[int] = field(init=False)
    ping_bytes: list[int] = field(init=False)
    cpu: list[float] = field(init=False)

    def __post_init__(self) -> None:
        for name in ("msgs_in", "bytes_in", "msgs_out", "bytes_out", "ping_bytes"):
            setattr(self, name, [0] * self.cap)
        self.cpu = [0.0] * self.cap

    def snapshot(self) -> dict[str, list[Any]]:
        return {k: list(getattr(self, k)) for k in ("msgs_in", "bytes_in", "msgs_out", "bytes_out",
                                                    "ping_bytes", "cpu")}


class Gossip:
    def __init__(self, sim: "Sim", cap: int) -> None:
        self.sim = sim
        self.loop = sim.loop
        self.links = sim.links
        self.rng = sim.rng
        self.c: Costs = sim.costs
        d = sim.design
        self.D, self.D_lo, self.D_hi = d.degree
        self.gossip_peers = d.gossip_peers
        self.window_len = d.gossip_window
        self.rate_limit = d.rate_limit
        self.replay = d.replay
        self.mesh: list[set[int]] = [set() for _ in range(cap)]
        self.cpu_free = [0.0] * cap
        self.traffic = Traffic(cap)
        self._spam: dict[tuple[int, int], deque[float]] = {}
        self._window: list[deque[int]] = [deque([0] * self.window_len, maxlen=self.window_len) for _ in range(cap)]
        self.recent: deque[Msg] = deque()        # published within the window, oldest first
        self.incomplete: dict[int, Msg] = {}
        self.latest: dict[int, Msg] = {}         # each node's newest message
        self.kept: list[Msg] | None = None       # every message, when a test asks
        self._ids = 0
        self.cap = cap
        # outcome counters
        self.dropped_queue = 0
        self.not_relayed = 0
        self.repaired = 0
        self.first_copies = 0
        self.duplicates = 0

    # ------------------------------------------------------------------ CPU
    def _work(self, v: int, t: float, cost: float) -> float:
        """Queue ``cost`` s of work on node v at ``t``; when it is done."""
        start = t if t > self.cpu_free[v] else self.cpu_free[v]
        done = start + cost
        self.cpu_free[v] = done
        self.traffic.cpu[v] += cost
        return done

    def background(self, v: int, cost: float) -> None:
        self._work(v, self.loop.now, cost)

    # ------------------------------------------------------------ messages
    def publish(self, origin: int, state: NodeState, sealed_bytes: int) -> Msg:
        now = self.loop.now
        self._ids += 1
        m = Msg(self._ids, origin, state, sealed_bytes + self.c.rpc_overhead, now, bytearray(self.cap),
                self.sim.reachable)
        m.have[origin] = 1
        self.latest[origin] = m
        if self.kept is not None:
            self.kept.append(m)
        self.recent.append(m)
        if m.got < m.reachable:
            self.incomplete[m.id] = m
        done = self._work(origin, now, self.c.publish)
        self._relay(origin, m, origin, done)
        return m

    def _relay(self, v: int, m: Msg, forwarder: int, t: float) -> None:
        w = self._window[v]
        w[0] += 1
        key = (v, forwarder)
        dq = self._spam.get(key)
        if dq is None:
            dq = self._spam[key] = deque()
        while dq and dq[0] <= t - 1.0:
            dq.popleft()
        if len(dq) >= self.rate_limit:
            self.not_relayed += 1
            return
        dq.append(t)
        targets = [u for u in self.mesh[v] if u != forwarder and u != m.origin]
        if not targets:
            return
        c, tr, size = self.c, self.traffic, m.size
        t = self._work(v, t, c.send * len(targets))
        tr.msgs_out[v] += len(targets)
        tr.bytes_out[v] += size * len(targets)
        send, at, arrive, have, nodes = self.links.send, self.loop.at, self._arrive, m.have, self.sim.nodes
        for u in targets:
            t_u = send(v, u, size, t)
            if have[u]:         # a duplicate for sure: charged now, no event (simulator speed)
                if not nodes[u].frozen:
                    self._duplicate(u, size)
            else:
                at(t_u, arrive, u, m, v)

    def _duplicate(self, u: int, size: int) -> None:
        """A copy u will drop as seen. Its work is queued now rather than at its arrival
        (a few ms later): ``_work`` is a FIFO and must be fed in time order."""
        tr = self.traffic
        tr.msgs_in[u] += 1
        tr.bytes_in[u] += size
        now = self.loop.now
        if self.cpu_free[u] - now > QUEUE_S:
            self.dropped_queue += 1
            return
        self.duplicates += 1
        self._work(u, now, self.c.recv)

    def _arrive(self, v: int, m: Msg, u: int) -> None:
        node = self.sim.nodes[v]
        if not node.up or node.frozen:
            return
        now = self.loop.now
        tr = self.traffic
        tr.msgs_in[v] += 1
        tr.bytes_in[v] += m.size
        if self.cpu_free[v] - now > QUEUE_S:
            self.dropped_queue += 1
            return
        if m.have[v]:
            self.duplicates += 1
            self._work(v, now, self.c.recv)
            return
        m.have[v] = 1
        m.got += 1
        if m.got >= m.reachable:
            self.incomplete.pop(m.id, None)
        self.first_copies += 1
        done = self._work(v, now, self.c.recv + self.c.first)
        self.loop.at(done, self._handled, v, m, u)

    def _handled(self, v: int, m: Msg, u: int) -> None:
        node = self.sim.nodes[v]
        if not node.up:
            return
        self.sim.delivered(v, m)
        self._relay(v, m, u, self.loop.now)

    # ------------------------------------------------------------ heartbeat
    def heartbeat(self, v: int) -> None:
        now = self.loop.now
        sim = self.sim
        mine = self.mesh[v]
        c, tr = self.c, self.traffic
        if len(mine) < self.D_lo:
            for u in sim.sample_up(self.D - len(mine), exclude=mine | {v}):
                mine.add(u)
                self.mesh[u].add(v)
                self._control(v, u)
        elif len(mine) > self.D_hi:
            for u in self.rng.sample(sorted(mine), len(mine) - self.D):
                mine.discard(u)
                self.mesh[u].discard(v)
                self._control(v, u)
        win = self._window[v]
        ids = sum(win)
        win.appendleft(0)
        others = sim.n_up - 1
        if ids:
            g = self.gossip_peers(others - len(mine))
            targets = sim.sample_up(g, exclude=mine | {v})
            size = c.sender_record + CONTROL_BYTES + ids * c.ihave_per_id
            tr.msgs_out[v] += len(targets)
            tr.bytes_out[v] += size * len(targets)
            self.background(v, c.send * len(targets))
            for u in targets:
                if sim.nodes[u].frozen:
                    continue
                tr.msgs_in[u] += 1
                tr.bytes_in[u] += size
                self.background(u, c.recv + ids * c.ihave_id)
            self._repair(v, targets, now)
        # pings: v pings every peer every PING_INTERVAL and answers theirs (4 frames a pair)
        pings = others / PING_INTERVAL
        tr.ping_bytes[v] += int(4 * pings * PING_BYTES)
        self.background(v, 4 * pings * c.frame)
        while self.recent and self.recent[0].t < now - self.window_len:
            old = self.recent.popleft()
            self.incomplete.pop(old.id, None)

    def _control(self, v: int, u: int) -> None:
        c, tr = self.c, self.traffic
        size = c.sender_record + CONTROL_BYTES
        tr.msgs_out[v] += 1
        tr.bytes_out[v] += size
        tr.msgs_in[u] += 1
        tr.bytes_in[u] += size
        self.background(v, c.send)
        if not self.sim.nodes[u].frozen:
            self.background(u, c.recv)

    def _repair(self, v: int, targets: list[int], now: float) -> None:
        if not self.incomplete:
            return
        horizon = now - self.window_len
        nodes = self.sim.nodes
        for m in islice(self.incomplete.values(), REPAIR_MAX):
            if not m.have[v] or m.t < horizon:
                continue
            for u in targets:
                if not m.have[u] and nodes[u].up and not nodes[u].frozen:
                    self.repaired += 1
                    # IWANT back to v, the message to u: one round trip after the IHAVE
                    self._control(u, v)
                    self.traffic.msgs_out[v] += 1
                    self.traffic.bytes_out[v] += m.size
                    t = self.links.send(v, u, m.size, now + self.links.rtt(v, u))
                    self.loop.at(t, self._arrive, u, m, v)

    # ------------------------------------------------------------ churn
    def join(self, v: int) -> None:
        """Node v just connected to every member: their replays reach it."""
        now = self.loop.now
        sim, c, tr = self.sim, self.c, self.traffic
        senders = [u for u in sim.up_list if u != v and not sim.nodes[u].frozen]
        if self.replay == "own":
            for u in senders:
                m = self.latest.get(u)
                if m is not None and m.t >= now - self.window_len:
                    self._work(u, now, c.send)
                    tr.msgs_out[u] += 1
                    tr.bytes_out[u] += m.size
                    self.loop.at(self.links.send(u, v, m.size, now), self._arrive, v, m, u)
            return
        window = [m for m in self.recent if m.t >= now - self.window_len]
        if not window or not senders:
            return
        # every sender writes its whole window; v reads the streams round robin, so the
        # k-th message of the window is first read after k rounds of len(senders) copies
        per = c.recv
        n = len(senders)
        for u in senders:
            self._work(u, now, c.send * len(window))
            tr.msgs_out[u] += len(window)
            tr.bytes_out[u] += sum(m.size for m in window)
        tr.msgs_in[v] += n * len(window)
        tr.bytes_in[v] += n * sum(m.size for m in window)
        start = max(now, self.cpu_free[v])
        for k, m in enumerate(window):
            if not m.have[v]:
                m.have[v] = 1
                m.got += 1
                self.first_copies += 1
                self.loop.at(start + (k + 1) * n * per + c.first, self._handled, v, m, senders[k % n])
        self.duplicates += n * len(window) - len(window)
        self._work(v, now, n * len(window) * per + len(window) * c.first)

    def leave(self, v: int) -> None:
        for u in self.mesh[v]:
            self.mesh[u].discard(v)
        self.mesh[v] = set()
