"""State gossip: one sealed NodeState per node per period on gossipsub topic ``mesh/state/1``.

Publishing (``Publisher``, paced by ``Pacer``): a heartbeat every ``period(n)`` and, after
``notify()``, a change at once, but never closer than ``min_gap(n)`` to the previous
message; a burst of changes becomes one message with the latest state. Each message
carries the whole state (the key ring aside, below), so a lost message costs nothing
but freshness.

Rate control (docs/scale.md, measured with bench/sim): every node receives every node's
messages, so a mesh of n nodes sending r messages/s each costs every member n*r first
deliveries, ~degree times as many duplicate copies (py-libp2p verifies an Ed25519 peer
record on each) and IHAVE lists of n*r ids per second: per-node work grows with n. The
mesh as a whole therefore keeps to ``MESH_RATE`` messages/s: with n nodes (this one
included, counted from our gossipsub peers) a node sends at most one message per
``min_gap = max(MIN_INTERVAL, n / MESH_RATE)`` and a heartbeat every
``period = max(TICK, 2 n / MESH_RATE)`` (capped at ``PERIOD_MAX``). Up to 25 nodes
nothing changes (4 messages/s at most, a heartbeat per second); at 100 nodes a change
waits up to 1 s and the heartbeat is 2 s; at 1,000, 10 s and 20 s. Each state announces
its ``period``, and receivers suspect a peer after 3 of *its* periods (mesh/view.py).
A heartbeat comes after 80-100% of the period (drawn each time), so nodes started
together drift apart instead of sending a whole mesh's states at the same instant. A
change of the key ring (a revocation) is urgent: it goes out ``MIN_INTERVAL`` after our
last message, whatever the mesh size.

The key ring (``keys``, ~230 bytes a record) is carried only when it changed (in the
next ``KEY_REPEATS`` messages), when a new peer subscribed (it has none of it yet) and
every ``KEYS_REFRESH`` s; other messages send an empty list, which receivers read as
"not sent" (merging records is monotonic: mesh/keys.py). ``KeyCarry`` decides.

The gossip layer stamps what the node's ``state()`` returns: ``node_id`` (our peer id),
``addrs`` (our advertised multiaddrs), ``ts`` (wall clock), ``seq``, ``period`` and the
key ring's omission. ``seq`` starts at the boot time in milliseconds and counts up, so
it keeps growing across restarts and receivers can drop stale or repeated states by seq.

Receiving: a topic validator (runs before gossipsub relays anything) rejects, and
counts in ``rejected``, messages that
  - were forwarded by a peer that is not admitted (mesh/p2p/admission.py),
  - do not open with the mesh's HMAC key, or have an unknown version (mesh/wire/state.py),
  - claim a ``node_id`` other than the libp2p-signed sender (one member cannot speak
    for another; gossipsub's strict signing proves the sender).
Rejected messages are neither delivered nor relayed.

GossipSub settings (py-libp2p 0.8.1; design brief, "What we learned"; docs/scale.md):
  - ``heartbeat_interval=1``: the default 120 s leaves a new peer out of the mesh for minutes.
  - ``adaptive_gossip_enabled=False``: otherwise the heartbeat drifts to 60 s.
  - ``max_messages_per_topic_per_second``: py-libp2p stops *relaying* (it still
    delivers) messages past this rate of first deliveries per forwarding peer and topic
    (default 10). A neighbour relays every member's state, so we allow ``RATE_LIMIT``;
    ``MESH_RATE`` keeps each forwarder's share far below it.
  - degree 6 (low 4, high 12): gossipsub's defaults from the spec.
  - IHAVE goes to ``GOSSIP_PEERS`` non-mesh peers per heartbeat (``_StateRouter``):
    py-libp2p sends it to a quarter of all non-mesh peers, and a node dials every
    member (mesh/p2p/node.py), so at 1,000 nodes each heartbeat sent ~250 IHAVEs.
  - A new peer gets only our own latest message replayed (``_StateRouter``): py-libp2p
    replays its whole 3-heartbeat message cache to every new connection, so a node
    joining a mesh of n got n times the mesh's last 3 s of traffic (at 100 nodes ~60,000
    copies, ~10 s of its CPU). Every member's own state reaches it that way at once.
  - the subscription queue holds 32 messages (py-libp2p's constant); the reader only
    parses and hands over, so it keeps up.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from mesh.view import TICK
from mesh.wire.state import BadMessage, NodeState, open_sealed, seal

__all__ = [
    "TOPIC", "TICK", "MIN_INTERVAL", "RATE_LIMIT", "MESH_RATE", "PERIOD_MAX", "DEGREE", "GOSSIP_PEERS",
    "KEY_REPEATS", "KEYS_REFRESH", "HEARTBEAT_JITTER", "Pacer", "KeyCarry", "open_pubsub", "StateValidator", "Publisher",
    "serve_subscriber",
]

log = logging.getLogger(__name__)

TOPIC = "mesh/state/1"
MIN_INTERVAL = 0.25        # s between two of our messages: at most 4/s
RATE_LIMIT = 100.0         # messages/s/topic accepted from one forwarding peer (see above)
MESH_RATE = 100.0          # messages/s for the whole mesh (bench/sim: docs/scale.md, "Rate control")
PERIOD_MAX = 30.0          # s: the longest heartbeat, whatever the mesh size
DEGREE = (6, 4, 12)        # gossipsub mesh degree: target, low, high (the spec's defaults)
GOSSIP_PEERS = 6           # non-mesh peers sent IHAVE per heartbeat (the spec's D_lazy)
KEY_REPEATS = 3            # messages that carry a changed key ring (one lost copy is harmless)
KEYS_REFRESH = 30.0        # s between two messages that carry an unchanged ring
HEARTBEAT_JITTER = 0.2     # a heartbeat comes after (1 - this) to 1 period


class Pacer:
    """When this node publishes next (module note, "Rate control"); no I/O, so the
    Publisher and bench/sim drive the same rules. ``n`` is the mesh size, us included.

    Heartbeats come after 80-100% of the period (drawn per message), so nodes started
    together do not stay in step and send a whole mesh's states in the same instant."""

    def __init__(self, budget: float = MESH_RATE, rng: random.Random | None = None) -> None:
        self.budget = budget
        self.last = -math.inf      # when our last message went out
        self.kicked = False        # a change waits to be published
        self.urgent = False        # ... and it is the key ring: MIN_INTERVAL, whatever n
        self._rng = rng or random.Random()
        self._stretch = 1.0

    def min_gap(self, n: int) -> float:
        return max(MIN_INTERVAL, n / self.budget)

    def period(self, n: int) -> float:
        return min(PERIOD_MAX, max(TICK, 2 * n / self.budget))

    def due(self, n: int) -> float:
        if self.urgent:
            return self.last + MIN_INTERVAL
        return self.last + (self.min_gap(n) if self.kicked else self.period(n) * self._stretch)

    def kick(self, *, urgent: bool = False) -> None:
        self.kicked = True
        self.urgent = self.urgent or urgent

    def sent(self, now: float) -> None:
        self.last, self.kicked, self.urgent = now, False, False
        self._stretch = self._rng.uniform(1 - HEARTBEAT_JITTER, 1.0)


class KeyCarry:
    """Whether our next message carries the key ring (module note); no I/O."""

    def __init__(self) -> None:
        self._ring: list[dict[str, Any]] | None = None
        self._repeats = 0
        self._at = -math.inf       # when a message last carried it
        self._peers = 0

    def changed(self, ring: list[dict[str, Any]]) -> bool:
        """The ring differs from the one our messages carried last."""
        return ring != self._ring

    def take(self, ring: list[dict[str, Any]], now: float, peers: int) -> bool:
        if ring != self._ring:
            self._ring, self._repeats = ring, KEY_REPEATS
        if peers > self._peers:
            self._repeats = max(self._repeats, 1)
        self._peers = peers
        if self._repeats > 0 or now - self._at >= KEYS_REFRESH:
            self._repeats = max(0, self._repeats - 1)
            self._at = now
            return True
        return False


class _StateRouter(GossipSub):
    """GossipSub with two py-libp2p behaviours changed for a topic of whole states
    (module note): IHAVE to ``GOSSIP_PEERS`` peers, and only our own latest message
    replayed to a new peer."""

    def _get_adaptive_gossip_peers_count(self, topic: str, total_peers: int) -> int:
        return min(GOSSIP_PEERS, max(0, total_peers))

    async def send_recent_messages(self, peer_id: ID, topic: str) -> None:
        if self.pubsub is None:
            return
        mine = self.pubsub.my_id.to_bytes()
        own = [m for m in (self.mcache.get(mid) for mid in self.mcache.window(topic))
               if m is not None and m.from_id == mine]
        if own and peer_id in self.pubsub.peers:
            rpc = rpc_pb2.RPC(publish=[own[-1]])
            rpc.senderRecord = env_to_send_in_RPC(self.pubsub.host)[0]
            self.send_rpc(peer_id, rpc)     # its outbound queue, as py-libp2p's replay would


@asynccontextmanager
async def open_pubsub(host: Any, gate: Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]],
                      validator: Callable[[ID, Any], bool]) -> AsyncIterator[Pubsub]:
    """Run gossipsub on ``host``; its stream handlers go through the admission ``gate``."""
    degree, low, high = DEGREE
    router = _StateRouter(
        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=degree, degree_low=low, degree_high=high,
        heartbeat_interval=1,
        adaptive_gossip_enabled=False,
        max_messages_per_topic_per_second=RATE_LIMIT,
    )
    pubsub = Pubsub(host, router)

    async def guarded(stream: Any) -> None:
        # An exception escaping a libp2p stream handler tears down the whole connection's
        # task tree; py-libp2p's pubsub raises one when a stream delivers a message after
        # the pubsub service stopped (shutdown), for instance.
        try:
            await pubsub.stream_handler(stream)
        except Exception as exc:
            log.debug("pubsub stream from %s ended: %r", stream.muxed_conn.peer_id, exc)
            with trio.CancelScope(shield=True):
                try:
                    await stream.reset()
                except Exception:
                    pass

    for proto in router.get_protocols():  # Pubsub registered them ungated
        host.set_stream_handler(proto, gate(guarded))
    pubsub.set_topic_validator(TOPIC, validator, False)
    async with background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        yield pubsub


class StateValidator:
    """The topic validator; ``rejected`` counts what it turned away."""

    def __init__(self, *, me: ID, hmac_key: bytes | Callable[[], Sequence[bytes]],
                 is_admitted: Callable[[ID], bool]) -> None:
        self._me = me
        self._keys: Callable[[], Sequence[bytes]] = (
            (lambda: [hmac_key]) if isinstance(hmac_key, bytes) else hmac_key)
        self._is_admitted = is_admitted
        self.rejected = 0

    def check(self, forwarder: ID, msg: Any) -> NodeState:
        if forwarder != self._me and not self._is_admitted(forwarder):
            raise BadMessage(f"forwarded by non-admitted peer {forwarder}")
        state = open_sealed(msg.data, self._keys())
        if state.node_id != ID(msg.from_id).to_base58():
            raise BadMessage("node_id does not match the message's signed sender")
        return state

    def __call__(self, forwarder: ID, msg: Any) -> bool:
        try:
            self.check(forwarder, msg)
            return True
        except Exception as exc:
            self.rejected += 1
            log.info("rejected a gossip message via %s: %s", forwarder, exc)
            return False


class Publisher:
    """Publishes our sealed state each period and soon after ``notify()`` (``Pacer``)."""

    def __init__(self, pubsub: Pubsub | None, *, hmac_key: bytes | Callable[[], bytes],
                 state: Callable[[], NodeState], node_id: str, addrs: Callable[[], list[str]],
                 mesh_size: Callable[[], int] | None = None, pacer: Pacer | None = None,
                 rekey: Callable[[], str] | None = None) -> None:
        self._pubsub = pubsub
        self._key: Callable[[], bytes] = (lambda: hmac_key) if isinstance(hmac_key, bytes) else hmac_key
        self._rekey = rekey
        self._state = state
        self._node_id = node_id
        self._addrs = addrs
        self._mesh_size = mesh_size or self._subscribed
        self.pacer = pacer or Pacer()
        self._keys = KeyCarry()
        self._seq = time.time_ns() // 1_000_000
        self._kick = trio.Event()
        self.published = 0

    def _subscribed(self) -> int:
        """The mesh size as gossipsub sees it: our topic's peers (a node dials every member
        it hears of, mesh/p2p/node.py), plus us."""
        return 1 + len(self._pubsub.peer_topics.get(TOPIC, ())) if self._pubsub is not None else 1

    def notify(self) -> None:
        self._kick.set()

    def kicked(self) -> None:
        """A change was notified: due at the pacer's min_gap, or at once (MIN_INTERVAL)
        when it is the key ring (a revocation must not wait for a large mesh's turn)."""
        self.pacer.kick(urgent=self._keys.changed(self._state().keys))

    def stamped(self, now: float) -> NodeState:
        """Our state as the next message carries it (``now``: the trio clock)."""
        self._seq += 1
        n = self._mesh_size()
        state = self._state()
        update: dict[str, Any] = {"node_id": self._node_id, "addrs": self._addrs(), "seq": self._seq,
                                  "ts": time.time(), "period": self.pacer.period(n)}
        if self._rekey is not None:
            update["rekey"] = self._rekey()
        if not self._keys.take(state.keys, now, n - 1):
            update["keys"] = []
        return state.model_copy(update=update)

    async def publish_now(self) -> None:
        try:
            data = seal(self.stamped(trio.current_time()), self._key())
        except Exception:
            log.exception("cannot build this node's state; skipping one gossip tick")
            return
        try:
            await self._pubsub.publish(TOPIC, data)
            self.published += 1
        except Exception as exc:
            log.warning("gossip publish failed: %r", exc)

    async def serve(self) -> None:
        while True:
            due = self.pacer.due(self._mesh_size())
            if trio.current_time() < due:
                with trio.move_on_at(due):
                    await self._kick.wait()
                if self._kick.is_set():          # a change: due moves earlier
                    self._kick = trio.Event()
                    self.kicked()
                continue
            await self.publish_now()
            self.pacer.sent(trio.current_time())


async def serve_subscriber(pubsub: Pubsub, validator: StateValidator, on_state: Callable[[str, NodeState], None],
                           *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Hand every valid state from another node to ``on_state(peer_id, state)``."""
    me = pubsub.my_id
    sub = await pubsub.subscribe(TOPIC)
    task_status.started()
    while True:
        msg = await sub.get()
        origin = ID(msg.from_id)
        if origin == me:
            continue
        try:
            # Validated already; parse again rather than share state with the validator.
            state = open_sealed(msg.data, validator._keys())
        except BadMessage:
            continue
        on_state(origin.to_base58(), state)
