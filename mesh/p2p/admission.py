"""Peer admission: every connection proves knowledge of the mesh token before use.

The pnet key check (mesh/p2p/host.py) already refuses connections from other meshes. This
layer binds that proof to the Noise-authenticated peer ids, so a node can act on "this
peer id is a member", and it is the gate every protocol handler goes through.

Handshake on ``/mesh/admit/1`` (I = the side that dialed, R = the side that accepted;
ids are the peers' multihash bytes as authenticated by Noise; k = the token's hmac_key)::

    I -> R   nI                                  32 random bytes
    R -> I   nR || HMAC(k, "mesh/admit/1|R" || idI || idR || nI || nR)
    I -> R   HMAC(k, "mesh/admit/1|I" || idI || idR || nI || nR)
    R -> I   0x01                                R checked I's MAC and admitted I
             I admits R on the 0x01, having checked R's MAC.

Each side sends its proof even when the other's is wrong, so a peer with another token
is denied by both sides in the same exchange (one side alone would leave the other
waiting for a timeout).

Both sides contribute a fresh nonce, both MACs cover both ids and both nonces, and the
role labels keep R's MAC from being replayed as I's. A wrong MAC denies the peer: its
connections are closed and, for ``DENY_TTL``, new ones are closed on arrival. I/O
errors and timeouts only close the connection (a flaky link is not an impostor). If
both sides dial at once, both run the handshake; either success admits.

Gate: ``Admission.gate(handler)`` wraps a stream handler. A stream from a peer whose
handshake is still running waits for it (bounded by ``ADMIT_TIMEOUT``): the peer may
open streams the moment its side of the handshake is done, before ours is. Streams of
peers that are denied or never admitted are reset.

Keys: a side MACs with the key it sends with and checks the other's MAC against every key
it accepts (one, or two during a token rotation's grace period: mesh/token.py).

Timing: the handshake is two round trips plus four HMACs, ~5-10 ms on loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

__all__ = ["ADMIT_PROTOCOL", "ADMIT_TIMEOUT", "DENY_TTL", "Admission", "serve_admission"]

log = logging.getLogger(__name__)

ADMIT_PROTOCOL = TProtocol("/mesh/admit/1")
ADMIT_TIMEOUT = 5.0        # s; a LAN handshake takes ~10 ms, this bounds a stalled peer
DENY_TTL = 60.0            # s; a denied peer that restarts with the right token gets back in after this
_NONCE = 32
_MAC = 32
_OK = b"\x01"

Status = Literal["pending", "admitted", "denied"]


@dataclass
class _Entry:
    status: Status = "pending"
    settled: trio.Event = field(default_factory=trio.Event)
    denied_at: float = 0.0
    reason: str = ""


def _mac(key: bytes, role: bytes, id_i: bytes, id_r: bytes, n_i: bytes, n_r: bytes) -> bytes:
    return hmac.new(key, b"mesh/admit/1|" + role + id_i + id_r + n_i + n_r, hashlib.sha256).digest()


def _check(mac: bytes, keys: Sequence[bytes], role: bytes, *parts: bytes) -> bool:
    return any(hmac.compare_digest(mac, _mac(k, role, *parts)) for k in keys)


class _Denied(Exception):
    pass


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except Exception as exc:  # StreamEOF, StreamReset, ...
            raise EOFError(f"stream ended during admission ({type(exc).__name__})") from exc
        if not chunk:
            raise EOFError("stream ended during admission")
        buf += chunk
    return buf


class Admission:
    """Who is admitted, pending or denied; the handshake itself; the handler gate.

    State only: the tasks that run handshakes live in ``serve_admission``.
    """

    def __init__(self, host: Any, hmac_key: bytes | Callable[[], tuple[bytes, Sequence[bytes]]], *,
                 on_admitted: Callable[[str], None] = lambda p: None,
                 on_denied: Callable[[str, str], None] = lambda p, r: None) -> None:
        self._host = host
        if isinstance(hmac_key, bytes):
            fixed = (hmac_key, [hmac_key])
            self._keys: Callable[[], tuple[bytes, Sequence[bytes]]] = lambda: fixed
        else:
            self._keys = hmac_key
        self._me = host.get_id()
        self._peers: dict[ID, _Entry] = {}
        self._on_admitted = on_admitted
        self._on_denied = on_denied
        self.denied_count = 0          # handshakes that failed the MAC check
        self.revoked: set[str] = set()  # peer ids (base58) refused for good (mesh/nodes.py)

    # -------------------------------------------------------------- state
    def _entry(self, peer: ID) -> _Entry:
        e = self._peers.get(peer)
        if e is None or (e.status == "denied" and time.monotonic() - e.denied_at > DENY_TTL):
            e = self._peers[peer] = _Entry()
        return e

    def status(self, peer: ID) -> Status | None:
        if peer.to_base58() in self.revoked:
            return "denied"
        e = self._peers.get(peer)
        if e is None:
            return None
        if e.status == "denied" and time.monotonic() - e.denied_at > DENY_TTL:
            return None
        return e.status

    def is_admitted(self, peer: ID) -> bool:
        return self.status(peer) == "admitted"

    def is_denied(self, peer: ID) -> bool:
        return self.status(peer) == "denied"

    def admitted_peers(self) -> list[ID]:
        return [p for p, e in self._peers.items() if e.status == "admitted"]

    def denied_reason(self, peer: ID) -> str:
        if peer.to_base58() in self.revoked:
            return "this node was revoked from the mesh"
        e = self._peers.get(peer)
        return e.reason if e else ""

    async def revoke(self, peer: ID) -> None:
        """Refuse `peer` for good and close its connections now."""
        if peer.to_base58() in self.revoked:
            return
        self.revoked.add(peer.to_base58())
        e = self._peers.get(peer)
        if e is not None:
            e.status, e.denied_at, e.reason = "denied", time.monotonic(), "revoked"
            e.settled.set()
        log.warning("revoked peer %s: its connections are closed and refused", peer)
        await self._drop(peer, None)

    async def expel(self, peer: ID, reason: str) -> None:
        """Deny `peer` (for ``DENY_TTL``, as a failed handshake) and close its connections."""
        self._deny(peer, reason)
        await self._drop(peer, None)

    def _admit(self, peer: ID) -> None:
        e = self._entry(peer)
        if e.status == "admitted":
            return
        e.status = "admitted"
        e.settled.set()
        log.debug("admitted %s", peer)
        self._on_admitted(peer.to_base58())

    def _deny(self, peer: ID, reason: str) -> None:
        e = self._entry(peer)
        e.status, e.denied_at, e.reason = "denied", time.monotonic(), reason
        e.settled.set()
        self.denied_count += 1
        log.warning("denied peer %s: %s", peer, reason)
        self._on_denied(peer.to_base58(), reason)

    def forget(self, peer: ID) -> None:
        """The peer's last connection closed: it must prove itself again next time."""
        e = self._peers.get(peer)
        if e is not None and e.status != "denied":
            if not e.settled.is_set():
                e.settled.set()
            del self._peers[peer]

    async def wait_admitted(self, peer: ID, timeout: float = ADMIT_TIMEOUT) -> bool:
        """True once the peer is admitted; False if denied or not admitted in time."""
        with trio.move_on_after(timeout):
            while True:
                e = self._entry(peer)
                if e.status != "pending":
                    return e.status == "admitted"
                await e.settled.wait()
        return self.is_admitted(peer)

    # -------------------------------------------------------------- gate
    def gate(self, handler: Callable[[INetStream], Awaitable[None]]) -> Callable[[INetStream], Awaitable[None]]:
        """Wrap a libp2p stream handler so only admitted peers reach it."""

        async def gated(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            if not await self.wait_admitted(peer):
                log.debug("reset a stream from non-admitted peer %s", peer)
                with trio.CancelScope(shield=True):
                    await _reset(stream)
                return
            await handler(stream)

        return gated

    # -------------------------------------------------------------- handshake
    async def initiate(self, peer: ID) -> bool:
        """Run the handshake as I over a new stream; True when both sides admitted."""
        if peer.to_base58() in self.revoked:
            await self._drop(peer, None)
            return False
        if self.is_admitted(peer):
            return True
        self._entry(peer)
        stream = None
        try:
            with trio.fail_after(ADMIT_TIMEOUT):
                stream = await self._host.new_stream(peer, [ADMIT_PROTOCOL])
                n_i = os.urandom(_NONCE)
                await stream.write(n_i)
                reply = await _read_exactly(stream, _NONCE + _MAC)
                n_r, mac_r = reply[:_NONCE], reply[_NONCE:]
                id_i, id_r = self._me.to_bytes(), peer.to_bytes()
                # Answer even when R's proof is wrong, so R can judge us too and both
                # sides deny each other in this one exchange.
                send, accepted = self._keys()
                await stream.write(_mac(send, b"I", id_i, id_r, n_i, n_r))
                if not _check(mac_r, accepted, b"R", id_i, id_r, n_i, n_r):
                    raise _Denied("its admission proof is wrong (it holds a different mesh token)")
                ok = await _read_exactly(stream, 1)
                if ok != _OK:
                    raise _Denied("it refused our admission proof")
            self._admit(peer)
            await stream.close()
            return True
        except _Denied as exc:
            self._deny(peer, str(exc))
            await self._drop(peer, stream)
            return False
        except (Exception, trio.TooSlowError) as exc:
            log.debug("admission handshake with %s failed: %r", peer, exc)
            if stream is not None:
                await _reset(stream)
            # The connection stays; the peer remains pending until the watchdog in
            # serve_admission closes it, or its own handshake with us succeeds.
            return False

    async def respond(self, stream: INetStream) -> None:
        """The ``/mesh/admit/1`` handler (never gated: this is how a peer gets in)."""
        peer = stream.muxed_conn.peer_id
        denied = self.is_denied(peer)  # still answer: a peer with another token learns it here
        self._entry(peer)
        try:
            with trio.fail_after(ADMIT_TIMEOUT):
                n_i = await _read_exactly(stream, _NONCE)
                n_r = os.urandom(_NONCE)
                id_i, id_r = peer.to_bytes(), self._me.to_bytes()
                send, accepted = self._keys()
                await stream.write(n_r + _mac(send, b"R", id_i, id_r, n_i, n_r))
                mac_i = await _read_exactly(stream, _MAC)
                if not _check(mac_i, accepted, b"I", id_i, id_r, n_i, n_r):
                    raise _Denied("its admission proof is wrong (it holds a different mesh token)")
                if denied:
                    await self._drop(peer, stream)
                    return
                self._admit(peer)
                await stream.write(_OK)
            await stream.close()
        except _Denied as exc:
            self._deny(peer, str(exc))
            await self._drop(peer, stream)
        except (Exception, trio.TooSlowError) as exc:
            log.debug("admission handshake from %s failed: %r", peer, exc)
            await _reset(stream)

    async def _drop(self, peer: ID, stream: INetStream | None) -> None:
        with trio.CancelScope(shield=True):
            if stream is not None:
                await _reset(stream)
            with trio.move_on_after(2):
                try:
                    await self._host.get_network().close_peer(peer)
                except Exception:
                    pass


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass


class _ConnEvents(INotifee):
    """Forwards swarm connection events into a channel; never blocks the swarm."""

    def __init__(self, send: trio.MemorySendChannel[tuple[str, ID, bool]]) -> None:
        self._send = send

    def _put(self, item: tuple[str, ID, bool]) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # a lost "connected" leaves the peer pending; the gate times out

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        direction = getattr(conn, "direction", None)
        outbound = getattr(direction, "name", str(direction)).upper() == "OUTBOUND"
        self._put(("connected", conn.muxed_conn.peer_id, outbound))

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._put(("disconnected", conn.muxed_conn.peer_id, False))

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Any) -> None:
        pass


async def serve_admission(host: Any, admission: Admission, *,
                          on_disconnected: Callable[[str], None] = lambda p: None,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the handshake for every new connection until cancelled."""
    send, recv = trio.open_memory_channel[tuple[str, ID, bool]](4096)
    notifee = _ConnEvents(send)
    network = host.get_network()
    network.register_notifee(notifee)
    host.set_stream_handler(ADMIT_PROTOCOL, admission.respond)

    def connected(peer: ID) -> bool:
        return bool(network.get_connections(peer))

    async def on_connect(peer: ID, outbound: bool) -> None:
        if admission.is_denied(peer):
            await admission._drop(peer, None)
            return
        if outbound:
            await admission.initiate(peer)
        # Watchdog for both roles: a peer not admitted in time is disconnected.
        if not await admission.wait_admitted(peer, ADMIT_TIMEOUT) and connected(peer) \
                and not admission.is_admitted(peer):
            log.debug("peer %s not admitted within %.0f s; disconnecting", peer, ADMIT_TIMEOUT)
            await admission._drop(peer, None)

    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for kind, peer, outbound in recv:
                if kind == "connected":
                    nursery.start_soon(on_connect, peer, outbound)
                elif not connected(peer):
                    admission.forget(peer)
                    on_disconnected(peer.to_base58())
    finally:
        network.remove_notifee(notifee)
