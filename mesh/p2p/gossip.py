"""State gossip: one sealed NodeState per node per tick on gossipsub topic ``mesh/state/1``.

Publishing (``Publisher``): every ``TICK`` (1 s) and, after ``notify()``, at once, but
never closer than ``MIN_INTERVAL`` (0.25 s) to the previous message: a burst of changes
becomes one message with the latest state, at most 4 per second. Each message carries
the whole state, so a lost message costs nothing but freshness.

The gossip layer stamps four fields of whatever the node's ``state()`` returns:
``node_id`` (our peer id), ``addrs`` (our advertised multiaddrs), ``ts`` (wall clock) and
``seq``. ``seq`` starts at the boot time in milliseconds and counts up, so it keeps
growing across restarts and receivers can drop stale or repeated states by seq alone.

Receiving: a topic validator (runs before gossipsub relays anything) rejects, and
counts in ``rejected``, messages that
  - were forwarded by a peer that is not admitted (mesh/p2p/admission.py),
  - do not open with the mesh's HMAC key, or have an unknown version (mesh/wire/state.py),
  - claim a ``node_id`` other than the libp2p-signed sender (one member cannot speak
    for another; gossipsub's strict signing proves the sender).
Rejected messages are neither delivered nor relayed.

GossipSub settings (py-libp2p 0.8.1; design brief, "What we learned"):
  - ``heartbeat_interval=1``: the default 120 s leaves a new peer out of the mesh for minutes.
  - ``adaptive_gossip_enabled=False``: otherwise the heartbeat drifts to 60 s.
  - ``max_messages_per_topic_per_second``: py-libp2p drops messages past this rate per
    *forwarding* peer and topic, own messages included (default 10). A neighbour relays
    every member's state, so with more than ~10 nodes the default would drop healthy
    traffic; we publish at most 4/s ourselves and allow ``RATE_LIMIT`` per forwarder.
  - degree 6 (low 4, high 12): gossipsub's defaults from the spec.
  - the subscription queue holds 32 messages (py-libp2p's constant); the reader only
    parses and hands over, so it keeps up.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from mesh.view import TICK
from mesh.wire.state import BadMessage, NodeState, open_sealed, seal

__all__ = [
    "TOPIC", "TICK", "MIN_INTERVAL", "RATE_LIMIT", "open_pubsub", "StateValidator", "Publisher", "serve_subscriber",
]

log = logging.getLogger(__name__)

TOPIC = "mesh/state/1"
MIN_INTERVAL = 0.25        # s between two of our messages: at most 4/s
RATE_LIMIT = 100.0         # messages/s/topic accepted from one forwarding peer (see above)


@asynccontextmanager
async def open_pubsub(host: Any, gate: Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]],
                      validator: Callable[[ID, Any], bool]) -> AsyncIterator[Pubsub]:
    """Run gossipsub on ``host``; its stream handlers go through the admission ``gate``."""
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6, degree_low=4, degree_high=12,
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

    def __init__(self, *, me: ID, hmac_key: bytes, is_admitted: Callable[[ID], bool]) -> None:
        self._me = me
        self._key = hmac_key
        self._is_admitted = is_admitted
        self.rejected = 0

    def check(self, forwarder: ID, msg: Any) -> NodeState:
        if forwarder != self._me and not self._is_admitted(forwarder):
            raise BadMessage(f"forwarded by non-admitted peer {forwarder}")
        state = open_sealed(msg.data, self._key)
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
    """Publishes our sealed state every tick and soon after ``notify()`` (coalesced)."""

    def __init__(self, pubsub: Pubsub, *, hmac_key: bytes, state: Callable[[], NodeState],
                 node_id: str, addrs: Callable[[], list[str]]) -> None:
        self._pubsub = pubsub
        self._key = hmac_key
        self._state = state
        self._node_id = node_id
        self._addrs = addrs
        self._seq = time.time_ns() // 1_000_000
        self._kick = trio.Event()
        self.published = 0

    def notify(self) -> None:
        self._kick.set()

    def stamped(self) -> NodeState:
        self._seq += 1
        return self._state().model_copy(update={
            "node_id": self._node_id, "addrs": self._addrs(), "seq": self._seq, "ts": time.time(),
        })

    async def publish_now(self) -> None:
        try:
            data = seal(self.stamped(), self._key)
        except Exception:
            log.exception("cannot build this node's state; skipping one gossip tick")
            return
        try:
            await self._pubsub.publish(TOPIC, data)
            self.published += 1
        except Exception as exc:
            log.warning("gossip publish failed: %r", exc)

    async def serve(self) -> None:
        last = -math.inf
        while True:
            with trio.move_on_after(max(0.0, last + TICK - trio.current_time())):
                await self._kick.wait()
            gap = last + MIN_INTERVAL - trio.current_time()
            if gap > 0:
                await trio.sleep(gap)
            self._kick = trio.Event()
            await self.publish_now()
            last = trio.current_time()


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
            state = open_sealed(msg.data, validator._key)
        except BadMessage:
            continue
        on_state(origin.to_base58(), state)
