"""The mesh's peer-to-peer layer, as the node sees it: ``open_p2p(...) -> P2P``.

``open_p2p`` composes, in one nursery that it owns for the life of the block:

    host        mesh/p2p/host.py       libp2p: TCP + pnet(token) + Noise + yamux, persistent identity
    admission   mesh/p2p/admission.py  HMAC handshake on every connection; gate for every handler
    gossip      mesh/p2p/gossip.py     our sealed NodeState every second and on notify_changed()
    view        mesh/view.py       membership from gossip, suspect/drop timers, RTT
    discovery   mesh/p2p/discovery.py  static peers (re-dialed forever), mDNS (optional)
    rekey       mesh/p2p/rekey.py      token rotation: push, grace period, retirement

plus three small services of its own:

- pings: one ``/mesh/ping/1`` stream per admitted peer, an 8-byte echo every
  ``PING_INTERVAL`` (2 s), feeding the view's RTT (mesh/p2p/ping.py).
- dials: peers we learn about from gossip or mDNS are dialed (at most once per
  ``REDIAL_INTERVAL`` each), so a mesh bootstrapped through one static peer becomes
  fully connected and the router's first stream to any member finds a live connection.
- ticks: the view's suspect/drop clock, every ``TICK_INTERVAL`` (0.5 s, so "unseen for 3 s"
  is noticed within 3.5 s).

Streams. ``Stream`` wraps a libp2p stream: ``read`` returns b"" at EOF (libp2p raises),
errors become ``PeerError``, ``close()`` half-closes (the peer reads EOF; we can still
read its answer) and releases the stream in py-libp2p's accounting; ``reset()`` aborts.
``async with stream:`` resets on error and closes otherwise. Handlers get their stream
closed (or reset, if they raise or are cancelled) when they return: py-libp2p leaves
the stream of a handler that raised open, and its peer waiting, forever. A writer whose
reader stops reading for 5 s gets PeerError (py-libp2p's yamux window-update timeout).

Errors. ``open_stream`` and ``connect`` raise ``AdmissionDenied`` when the peer holds
another token (pnet key check or handshake) or was denied, and ``PeerError`` when it
cannot be reached, does not answer within ``DIAL_TIMEOUT``, or does not speak the
protocol. Nothing here waits longer than ``DIAL_TIMEOUT`` + ``ADMIT_TIMEOUT`` +
``STREAM_OPEN_TIMEOUT``.

Logging. py-libp2p logs expected churn (a peer with another token, a closed connection)
at ERROR with tracebacks, printed through ``logging.lastResort`` (libp2p gives its logger
no handler). Unless ``LIBP2P_DEBUG`` is set (py-libp2p's own switch), ``open_p2p`` raises
the ``libp2p`` logger's level to CRITICAL. Our own modules log under ``mesh.*``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from mesh.p2p.admission import ADMIT_TIMEOUT, Admission, serve_admission
from mesh.p2p.discovery import DIAL_TIMEOUT, open_mdns, serve_static_peer
from mesh.errors import AdmissionDenied, BadRequest, Conflict, MeshError, PeerError
from mesh.p2p.gossip import Publisher, StateValidator, open_pubsub, serve_subscriber
from mesh.p2p.host import (SelfDial, _reason, _value, connect_addr, dial, open_host, resolve_dns,
                           split_peer_addr)
from mesh.p2p.identity import load_or_create_identity
from mesh.token import MeshSecrets, Token, new_token, parse_token
from mesh.view import Connected, Disconnected, StateSeen, Tick, View
from mesh.p2p.ping import PING_PROTOCOL, handle_ping, serve_pings
from mesh.p2p import rekey
from mesh.p2p.stream import Stream
from mesh.wire.state import NodeState

__all__ = ["P2P", "Stream", "open_p2p", "PING_PROTOCOL", "DIAL_TIMEOUT", "STREAM_OPEN_TIMEOUT"]

log = logging.getLogger(__name__)

STREAM_OPEN_TIMEOUT = 5.0    # s for multistream negotiation of a new stream
REDIAL_INTERVAL = 5.0        # s between two dials of one gossiped / mDNS-found peer
TICK_INTERVAL = 0.5          # s between view clock ticks
MISMATCH_WARN_EVERY = 60.0   # s; one warning per address, as a wrong-token peer retries forever


class _Mismatches:
    """Connections refused by the pnet key check: a peer with another token."""

    def __init__(self) -> None:
        self.count = 0
        self._at: dict[tuple[str, int], float] = {}

    def record(self, addr: tuple[str, int] | None) -> None:
        self.count += 1
        if addr is not None:
            self._at[(str(addr[0]), int(addr[1]))] = trio.current_time()

    def since(self, addrs: Sequence[Any], t0: float) -> bool:
        for a in addrs:
            try:
                ma = multiaddr.Multiaddr(str(a))
                key = (str(_value(ma, "ip4") or _value(ma, "ip6")), int(_value(ma, "tcp") or -1))
            except Exception:
                continue
            if self._at.get(key, -1.0) >= t0:
                return True
        return False


class P2P:
    """The running p2p layer. Made by ``open_p2p``; valid inside its ``async with`` block."""

    def __init__(self, host: Any, secrets: MeshSecrets, name: str,
                 on_rotated: Callable[[MeshSecrets], None] = lambda s: None) -> None:
        self._host = host
        self.secrets = secrets
        self._on_rotated = on_rotated
        # when the node first saw a peer (None: never); the node sets it from its book
        # of admitted nodes (mesh/nodes.py); a rotation is pushed during its grace period
        # only to peers first seen before it (rekey.py)
        self.first_seen: Callable[[str], float | None] = lambda peer: None
        self._rotated_at = 0.0
        self._rotation = trio.Event()      # set and replaced on every rotation
        self._me: ID = host.get_id()
        self.peer_id: str = self._me.to_base58()
        self.name = name
        self.view = View()
        self._mism = _Mismatches()
        self._admission = Admission(host, lambda: (secrets.sending.hmac_key, secrets.hmac_keys()),
                                    on_admitted=self._on_admitted, on_denied=self._on_denied)
        self._validator = StateValidator(me=self._me, hmac_key=secrets.hmac_keys,
                                         is_admitted=self._admission.is_admitted)
        self._publisher: Publisher | None = None
        self._conn_changed = trio.Event()
        self._dial_locks: dict[ID, trio.Lock] = {}
        self._dial_send, self._dial_recv = trio.open_memory_channel[tuple[str, list[str]]](1024)
        self._admitted_send, self._admitted_recv = trio.open_memory_channel[str](1024)

    # ------------------------------------------------------------------ public
    @property
    def mesh_id(self) -> str:
        return self.secrets.mesh_id

    async def rotate(self, grace_s: float) -> dict[str, Any]:
        """Replace the mesh token (rekey.py): a new one for every admitted peer now; the
        old one retires in ``grace_s`` seconds. Returns the new token, its deadline, and
        which peers acknowledged (``delivered``) or not (``missed``: peer -> why)."""
        if not rekey.MIN_GRACE <= grace_s <= rekey.MAX_GRACE:
            raise BadRequest(f"grace_s must be between {rekey.MIN_GRACE:g} and {rekey.MAX_GRACE:g} seconds",
                             param="grace_s")
        if self.secrets.in_grace():
            left = self.secrets.retire_at - time.time()
            raise Conflict(f"a token rotation is in its grace period ({left:.0f} s left); wait for its end",
                           code="rotation_in_progress")
        new = parse_token(new_token(self.secrets.current.bootstrap))
        since = time.time()
        retire_at = since + grace_s
        self.apply_rotation(new, retire_at, since=since, source="")
        delivered: list[str] = []
        missed: dict[str, str] = {}

        async def one(peer: str) -> None:
            why = await rekey.push(self, peer, new, retire_at, since)
            if why:
                missed[peer] = why
            else:
                delivered.append(peer)

        async with trio.open_nursery() as nursery:
            for peer in self.connected_peers():
                nursery.start_soon(one, peer)
        return {"token": new.encode(), "mesh": new.mesh_id, "retire_at": retire_at,
                "grace_s": grace_s, "delivered": sorted(delivered), "missed": missed}

    def apply_rotation(self, new: Token, retire_at: float, *, since: float, source: str) -> None:
        """Take on a rotation begun at ``since`` (ours, or pushed by ``source``); see rekey.py."""
        s = self.secrets
        if new == s.current:
            return                                          # pushes cross: already ours
        if s.in_grace():
            raise Conflict("this node is in another rotation's grace period", code="rotation_in_progress")
        s.rotate(new, retire_at)
        self._rotated_at = since
        self._on_rotated(s)
        self._rotation.set()
        self._rotation = trio.Event()
        log.warning("mesh token rotated%s: mesh %s now; the old token retires in %.0f s",
                    f" by {source[-8:]}" if source else "", new.mesh_id, retire_at - time.time())
        self.notify_changed()                               # gossip our proof soon

    @property
    def addrs(self) -> list[str]:
        """Our advertised multiaddrs, each ending in /p2p/<peer id>."""
        return [str(a) for a in self._host.get_addrs()]

    @property
    def denied_count(self) -> int:
        """Connections and handshakes refused because the peer holds another token."""
        return self._admission.denied_count + self._mism.count

    @property
    def rejected_gossip_count(self) -> int:
        return self._validator.rejected

    def notify_changed(self) -> None:
        """Our state changed: publish it soon (coalesced, at most 4 messages/s)."""
        if self._publisher is not None:
            self._publisher.notify()

    def is_connected(self, peer_id: str) -> bool:
        try:
            pid = ID.from_base58(peer_id)
        except Exception:
            return False
        return self._connected(pid)

    async def revoke(self, peer_ids: set[str]) -> None:
        """Refuse these peers for good (mesh/nodes.py) and close their connections."""
        for peer_id in peer_ids - self._admission.revoked:
            try:
                pid = ID.from_base58(peer_id)
            except Exception:
                log.warning("ignored a revocation of a malformed peer id %r", peer_id[:60])
                continue
            await self._admission.revoke(pid)

    def connected_peers(self) -> list[str]:
        """Peers with a live, admitted connection."""
        return sorted(p.to_base58() for p in self._admission.admitted_peers() if self._connected(p))

    def set_handler(self, protocol: str, handler: Callable[[Stream, str], Awaitable[None]]) -> None:
        """Serve ``protocol``: ``handler(stream, peer_id)`` runs per stream, admitted peers only."""

        async def run(net_stream: Any) -> None:
            peer = net_stream.muxed_conn.peer_id.to_base58()
            stream = Stream(net_stream, peer, protocol)
            try:
                await handler(stream, peer)
            except PeerError as exc:  # the peer went away or reset: routine
                log.debug("handler for %s from %s: %s", protocol, peer, exc)
                await stream.reset()
            except Exception:
                log.exception("handler for %s from %s failed", protocol, peer)
                await stream.reset()
            else:
                await stream.close()
            finally:
                if not stream.ended:  # cancelled: the connection is going away
                    await stream.reset()

        self._host.set_stream_handler(TProtocol(protocol), self._admission.gate(run))

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """A new stream to an admitted peer, dialing it first if needed."""
        pid = self._parse_peer(peer_id)
        await self._ensure_admitted(pid)
        try:
            with trio.fail_after(STREAM_OPEN_TIMEOUT):
                net = await self._host.new_stream(pid, [TProtocol(protocol)])
        except trio.TooSlowError as exc:
            raise PeerError(f"peer {peer_id[-8:]} did not open {protocol} within {STREAM_OPEN_TIMEOUT:.0f} s") from exc
        except Exception as exc:
            raise PeerError(f"peer {peer_id[-8:]} cannot open {protocol}: {_reason(exc)}") from exc
        return Stream(net, peer_id, protocol)

    async def connect(self, addr: str) -> str:
        """Connect to a peer address (``/ip4/../tcp/N[/p2p/<id>]``); its peer id once admitted.
        ``/dns4/NAME/...`` and ``/dns/NAME/...`` are resolved at each dial (compose service
        names, hosts that change address)."""
        addr = await resolve_dns(addr)
        ma, pid = split_peer_addr(addr)
        if pid is not None:
            self._check_not_self_or_denied(pid)
        t0 = trio.current_time()
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                if pid is None:
                    got = await connect_addr(self._host, addr)
                else:
                    async with self._lock(pid):
                        got = await connect_addr(self._host, addr)
        except (PeerError, trio.TooSlowError) as exc:
            if self._mism.since([ma], t0):
                raise AdmissionDenied(f"{addr} belongs to another mesh (its token differs)") from exc
            if isinstance(exc, trio.TooSlowError):
                raise PeerError(f"{addr} did not answer within {DIAL_TIMEOUT:.0f} s") from exc
            raise
        await self._await_admission(got)
        return got.to_base58()

    # ------------------------------------------------------------------ internals
    def _parse_peer(self, peer_id: str) -> ID:
        try:
            pid = ID.from_base58(peer_id)
        except Exception as exc:
            raise PeerError(f"not a peer id: {peer_id!r}") from exc
        self._check_not_self_or_denied(pid)
        return pid

    def _check_not_self_or_denied(self, pid: ID) -> None:
        if pid == self._me:
            raise SelfDial("that is this node itself")
        if self._admission.is_denied(pid):
            raise AdmissionDenied(f"peer {pid.to_base58()[-8:]} was denied: {self._admission.denied_reason(pid)}")

    def _connected(self, pid: ID) -> bool:
        return any(not c.is_closed for c in self._host.get_network().get_connections(pid))

    def _lock(self, pid: ID) -> trio.Lock:
        lock = self._dial_locks.get(pid)
        if lock is None:
            lock = self._dial_locks[pid] = trio.Lock()
        return lock

    def _known_addrs(self, pid: ID, extra: Sequence[str] = ()) -> list[multiaddr.Multiaddr]:
        out: list[multiaddr.Multiaddr] = []
        for a in extra:
            try:
                out.append(split_peer_addr(a)[0])
            except MeshError:
                pass
        peer = self.view.get(pid.to_base58())
        if peer is not None:
            for a in peer.state.addrs:
                try:
                    out.append(split_peer_addr(a)[0])
                except MeshError:
                    pass
        try:
            out.extend(self._host.get_peerstore().addrs(pid))
        except Exception:
            pass
        return out

    async def _ensure_admitted(self, pid: ID, extra_addrs: Sequence[str] = ()) -> None:
        if not self._connected(pid):
            addrs = self._known_addrs(pid, extra_addrs)
            if not addrs:
                raise PeerError(f"no known address for peer {pid.to_base58()[-8:]}")
            t0 = trio.current_time()
            try:
                with trio.fail_after(DIAL_TIMEOUT):
                    async with self._lock(pid):
                        await dial(self._host, pid, addrs)
            except (PeerError, trio.TooSlowError) as exc:
                if self._mism.since(addrs, t0):
                    raise AdmissionDenied(
                        f"peer {pid.to_base58()[-8:]} belongs to another mesh (its token differs)") from exc
                if isinstance(exc, trio.TooSlowError):
                    raise PeerError(f"peer {pid.to_base58()[-8:]} did not answer within {DIAL_TIMEOUT:.0f} s") from exc
                raise
        await self._await_admission(pid)

    async def _await_admission(self, pid: ID) -> None:
        if await self._admission.wait_admitted(pid, ADMIT_TIMEOUT):
            return
        if self._admission.is_denied(pid):
            raise AdmissionDenied(f"peer {pid.to_base58()[-8:]} was denied: {self._admission.denied_reason(pid)}")
        raise PeerError(f"peer {pid.to_base58()[-8:]} was not admitted within {ADMIT_TIMEOUT:.0f} s")

    def _changed_event(self) -> trio.Event:
        return self._conn_changed

    def _bump(self) -> None:
        self._conn_changed.set()
        self._conn_changed = trio.Event()

    # callbacks (run in trio, must not block)
    def _on_admitted(self, peer: str) -> None:
        self.view.apply(Connected(peer))
        self._bump()
        try:
            self._admitted_send.send_nowait(peer)
        except trio.WouldBlock:
            pass

    def _rekey_proof(self) -> str:
        return self.secrets.proof(self._me.to_bytes()).hex() if self.secrets.in_grace() else ""

    def _on_denied(self, peer: str, reason: str) -> None:
        self._bump()

    def _on_disconnected(self, peer: str) -> None:
        self.view.apply(Disconnected(peer))
        self._bump()

    def _on_state(self, peer: str, state: NodeState) -> None:
        self.view.apply(StateSeen(peer, state, trio.current_time(), time.time()))
        if not self.is_connected(peer):
            self._request_dial(peer, state.addrs)

    def _request_dial(self, peer: str, addrs: list[str]) -> None:
        try:
            self._dial_send.send_nowait((peer, addrs))
        except trio.WouldBlock:
            pass

    # services
    async def _serve_ticks(self) -> None:
        while True:
            self.view.apply(Tick(trio.current_time()))
            await trio.sleep(TICK_INTERVAL)

    async def _serve_dials(self) -> None:
        last: dict[ID, float] = {}
        in_flight: set[ID] = set()

        async def one(pid: ID, addrs: list[str]) -> None:
            try:
                await self._ensure_admitted(pid, addrs)
            except MeshError as exc:
                log.debug("dial to %s failed: %s", pid, exc)
            finally:
                in_flight.discard(pid)

        async with trio.open_nursery() as nursery:
            async for peer, addrs in self._dial_recv:
                try:
                    pid = ID.from_base58(peer)
                except Exception:
                    continue
                now = trio.current_time()
                if (pid == self._me or pid in in_flight or self._connected(pid)
                        or self._admission.is_denied(pid) or now - last.get(pid, -REDIAL_INTERVAL) < REDIAL_INTERVAL):
                    continue
                last[pid] = now
                in_flight.add(pid)
                nursery.start_soon(one, pid, addrs)

    async def _serve_rekey_pushes(self) -> None:
        """During a grace period, hand the new token to every connected peer that shows no
        proof of it and was first seen before the rotation began (rekey.py, 3); one try
        per peer per ``rekey.REPUSH_INTERVAL``."""
        tried: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            while True:
                s = self.secrets
                if not s.in_grace():
                    tried.clear()
                    await self._rotation.wait()
                    continue
                now = trio.current_time()
                for peer in self.connected_peers():
                    if now - tried.get(peer, -rekey.REPUSH_INTERVAL) < rekey.REPUSH_INTERVAL:
                        continue
                    if self._has_proof(peer):
                        continue
                    seen = self.first_seen(peer)
                    if seen is None or seen >= self._rotated_at:
                        if peer not in tried:
                            log.info("no token rotation for %s: first seen in the grace period", peer[-8:])
                        tried[peer] = float("inf")      # a machine new since the rotation gets nothing
                        continue
                    tried[peer] = now
                    nursery.start_soon(self._push_late, peer, s.current, s.retire_at)
                with trio.move_on_after(1.0):
                    await self._conn_changed.wait()

    def _has_proof(self, peer: str) -> bool:
        p = self.view.get(peer)
        try:
            return self.secrets.check_proof(ID.from_base58(peer).to_bytes(),
                                            bytes.fromhex(p.state.rekey if p else ""))
        except ValueError:
            return False

    async def _push_late(self, peer: str, token: Token, retire_at: float) -> None:
        why = await rekey.push(self, peer, token, retire_at, self._rotated_at)
        if why:
            log.warning("could not hand the token rotation to %s (admitted in the grace period): %s",
                        peer[-8:], why)
        else:
            log.info("token rotation handed to %s (admitted in the grace period)", peer[-8:])

    async def _serve_retirement(self) -> None:
        """At a rotation's deadline: drop the retiring token, expel peers without proof."""
        while True:
            s, changed = self.secrets, self._rotation
            if s.retiring is None:
                await changed.wait()
                continue
            delay = s.retire_at - time.time()
            if delay > 0:
                with trio.move_on_after(delay):
                    await changed.wait()
                continue
            s.retire()
            self._on_rotated(s)
            expelled = []
            for pid in self._admission.admitted_peers():
                if not self._has_proof(pid.to_base58()):
                    expelled.append(pid.to_base58()[-8:])
                    await self._admission.expel(pid, "it holds only the retired mesh token")
            log.warning("the retired mesh token is no longer accepted (mesh %s only)%s", s.mesh_id,
                        f"; closed {', '.join(expelled)}: no proof of the new token" if expelled else "")
            self.notify_changed()

    async def _serve_mdns(self) -> None:
        ports = [a.value_for_protocol("tcp") for a in self._host.get_transport_addrs()]
        while True:                       # again under the new mesh id after a rotation
            rotated = self._rotation
            with trio.CancelScope() as scope:
                async def restart() -> None:
                    await rotated.wait()
                    scope.cancel()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(restart)
                        async with open_mdns(mesh_id=self.mesh_id, peer_id=self.peer_id,
                                             port=int(ports[0]), addrs=self.addrs) as finds:
                            async for peer, addrs in finds:
                                log.debug("mDNS found %s at %s", peer, addrs)
                                self._request_dial(peer, addrs)
                except Exception as exc:  # best effort: no multicast, a name clash, a zeroconf bug
                    log.warning("mDNS discovery unavailable (%r); use --peer to join other nodes", exc)
                    await rotated.wait()


def _quiet_libp2p_logs() -> None:
    # Importing libp2p sets its logger to WARNING with no handler, so without this its
    # expected-churn errors reach stderr through logging.lastResort.
    # libp2p.network.auto_connector pins itself to INFO; it is stopped anyway (mesh/p2p/host.py).
    if not os.environ.get("LIBP2P_DEBUG"):
        for name in ("libp2p", "libp2p.network.auto_connector"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _sole_exception(eg: BaseExceptionGroup) -> BaseException | None:  # type: ignore[type-arg]
    exc: BaseException = eg
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return None if isinstance(exc, BaseExceptionGroup) else exc


@asynccontextmanager
async def open_p2p(*, home: Path, token: Token | MeshSecrets, name: str, listen_host: str, p2p_port: int,
                   peers: Sequence[str], mdns: bool, state: Callable[[], NodeState],
                   on_rotated: Callable[[MeshSecrets], None] = lambda s: None) -> AsyncIterator[P2P]:
    """Join the mesh for the duration of the block (see the module note). ``token``: the
    mesh token, or the node's secrets during a rotation (mesh/token.py); ``on_rotated`` is
    called when a rotation changed them (the node stores them).

    Exceptions come out as raised, not wrapped in the exception groups of the nurseries
    inside (a group is re-raised only when it holds several).
    """
    err: BaseException | None = None
    try:
        secrets = token if isinstance(token, MeshSecrets) else MeshSecrets(token)
        async with _running_p2p(home=home, secrets=secrets, name=name, listen_host=listen_host,
                                p2p_port=p2p_port, peers=peers, mdns=mdns, state=state,
                                on_rotated=on_rotated) as p2p:
            yield p2p
    except BaseExceptionGroup as eg:
        err = _sole_exception(eg)
        if err is None:
            raise
    if err is not None:
        raise err  # outside the except block, so its __context__ is left alone


@asynccontextmanager
async def _running_p2p(*, home: Path, secrets: MeshSecrets, name: str, listen_host: str, p2p_port: int,
                       peers: Sequence[str], mdns: bool, state: Callable[[], NodeState],
                       on_rotated: Callable[[MeshSecrets], None]) -> AsyncIterator[P2P]:
    _quiet_libp2p_logs()
    key_pair = load_or_create_identity(Path(home))
    holder: dict[str, P2P] = {}
    warned: dict[str, float] = {}

    def on_mismatch(addr: tuple[str, int] | None) -> None:
        if "p2p" in holder:
            holder["p2p"]._mism.record(addr)
        ip = str(addr[0]) if addr else "?"
        now = trio.current_time()
        quiet = now - warned.get(ip, -MISMATCH_WARN_EVERY) < MISMATCH_WARN_EVERY
        warned[ip] = warned[ip] if quiet else now
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "refused a connection with %s: it holds a different mesh token", ip)

    async with open_host(key_pair, secrets.psks, listen_host=listen_host, port=p2p_port,
                         on_mismatch=on_mismatch) as host:
        p2p = holder["p2p"] = P2P(host, secrets, name, on_rotated)
        async with trio.open_nursery() as outer:
            await outer.start(partial(serve_admission, host, p2p._admission, on_disconnected=p2p._on_disconnected))
            async with open_pubsub(host, p2p._admission.gate, p2p._validator) as pubsub:
                publisher = Publisher(pubsub, hmac_key=lambda: secrets.sending.hmac_key, state=state,
                                      node_id=p2p.peer_id, addrs=lambda: p2p.addrs, rekey=p2p._rekey_proof)
                p2p._publisher = publisher
                p2p.set_handler(PING_PROTOCOL, handle_ping)
                p2p.set_handler(rekey.REKEY_PROTOCOL, partial(rekey.handle, p2p))
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve_subscriber, pubsub, p2p._validator, p2p._on_state)
                    nursery.start_soon(publisher.serve)
                    nursery.start_soon(p2p._serve_ticks)
                    nursery.start_soon(p2p._serve_dials)
                    nursery.start_soon(serve_pings, p2p)
                    nursery.start_soon(p2p._serve_rekey_pushes)
                    nursery.start_soon(p2p._serve_retirement)
                    for addr in dict.fromkeys([*secrets.current.bootstrap, *peers]):
                        await nursery.start(partial(serve_static_peer, addr, connect=p2p.connect,
                                                    is_connected=p2p.is_connected, changed=p2p._changed_event))
                    if mdns:
                        nursery.start_soon(p2p._serve_mdns)
                    log.info("p2p up: %s mesh %s at %s", p2p.peer_id, p2p.mesh_id, ", ".join(p2p.addrs))
                    try:
                        yield p2p
                    finally:
                        p2p._publisher = None
                        nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
