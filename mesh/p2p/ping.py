"""`/mesh/ping/1`: RTT samples for the view (mesh/view.py), one stream per admitted peer.

An 8-byte random payload echoed every PING_INTERVAL; the round trip feeds the view's
exponentially weighted RTT, which the router uses to break ties between peers.
"""

from __future__ import annotations

import logging
import os

import trio
from libp2p.peer.id import ID

from mesh.errors import MeshError, PeerError
from mesh.p2p.stream import Stream
from mesh.view import RttMeasured

__all__ = ["PING_PROTOCOL", "serve_pings", "handle_ping"]

log = logging.getLogger(__name__)

PING_PROTOCOL = "/mesh/ping/1"
PING_INTERVAL = 2.0          # s between RTT samples per peer
PING_TIMEOUT = 2.0           # s; a LAN round trip is ~1 ms
_PING_BYTES = 8


async def serve_pings(p2p) -> None:
    """One pinger per admitted peer (as the P2P layer reports them), for ever."""
    pinging: set[str] = set()

    async def pinger(peer: str) -> None:
        pid = ID.from_base58(peer)
        try:
            while p2p._connected(pid) and p2p._admission.is_admitted(pid):
                try:
                    async with await p2p.open_stream(peer, PING_PROTOCOL) as s:
                        while True:
                            payload = os.urandom(_PING_BYTES)
                            t0 = trio.current_time()
                            await s.write(payload)
                            with trio.fail_after(PING_TIMEOUT):
                                echo = await s.read_exactly(_PING_BYTES)
                            if echo != payload:
                                raise PeerError("ping echo mismatch")
                            p2p.view.apply(RttMeasured(peer, (trio.current_time() - t0) * 1000.0))
                            await trio.sleep(PING_INTERVAL)
                except (MeshError, trio.TooSlowError) as exc:
                    log.debug("ping %s: %s", peer, exc)
                await trio.sleep(PING_INTERVAL)
        finally:
            pinging.discard(peer)

    async with trio.open_nursery() as nursery:
        async for peer in p2p._admitted_recv:
            if peer not in pinging:
                pinging.add(peer)
                nursery.start_soon(pinger, peer)


async def handle_ping(stream: Stream, peer: str) -> None:
    while True:
        try:
            data = await stream.read_exactly(_PING_BYTES)
        except PeerError:
            return
        await stream.write(data)
