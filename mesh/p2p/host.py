"""The libp2p host: TCP + private-network key + Noise + yamux, configured for a LAN mesh.

Stack, bottom up: TCP -> mesh pnet (PSK from the token; mesh/p2p/pnet.py) -> Noise (the
only security protocol offered) -> yamux. Everything here is py-libp2p 0.8.1 configuration, plus two
small pieces of our own where the library's behaviour does not suit a LAN mesh.

Settings and where their values come from (design brief, "What we learned", unless noted):

- ``sec_opt`` = Noise only: the default list also offers plaintext and secio.
- ``ConnectionConfig(max_connections_per_peer=1)``: with the default 3 every connect waits
  250 ms of happy-eyeballs for a second connection.
- ``RetryConfig(max_retries=0)``: the default retries a failed dial 3 times, each bounded
  only by the 10 s upgrade timeout; callers here (static peers, open_stream) retry with
  their own deadlines and backoff.
- ``inbound_upgrade_timeout`` = 5 s (default 10): a stalled handshake holds a socket.
- ``max_connections`` = 10,000, ``min_connections`` = 0: py-libp2p keeps each accepted
  connection's inbound-limiter slot until the swarm stops, even after the connection
  closes (``Swarm._handle_inbound_connection`` waits on ``manager.wait_finished()``), so
  the default cap of 300 - 50 = 250 would refuse every inbound connection after 250
  reconnects over a node's lifetime.
- The swarm's AutoConnector is stopped once the host runs: below its watermarks it dials
  every peer in the peerstore (peers of other meshes, denied peers); we dial only static
  peers, mDNS finds and gossiped members (mesh/p2p/discovery.py, mesh/p2p/node.py).
- ``disable_identify_address_discovery``: advertised addresses are the listen addresses
  (wildcards expanded to the machine's addresses), never what a peer says it saw.
- Shutdown calls ``host.close()`` explicitly (bounded by ``SHUTDOWN_TIMEOUT``): leaving
  ``host.run()``'s block only cancels the swarm service, whose cleanup then dies on the
  cancellation and leaves the listening socket open.

Listening: ``/ip4/<host>/tcp/<port>``; port 0 means any free port. A wildcard host
(0.0.0.0) is never advertised: ``addrs_factory`` replaces it with the machine's IPv4
addresses (LAN first, loopback last), so peers, identify and mDNS see dialable addresses.
A fixed port is checked before binding because py-libp2p binds with SO_REUSEPORT, which
would let two nodes silently share (and split) one port.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from mesh.errors import BadRequest, PeerError
from mesh.p2p.pnet import PnetTCP, TokenMismatch

__all__ = [
    "PnetTCP", "TokenMismatch", "SelfDial", "build_host", "open_host", "listen_ip", "listen_addrs_for",
    "machine_ipv4_addrs", "connect_addr", "dial", "split_peer_addr",
]

log = logging.getLogger(__name__)

INBOUND_UPGRADE_TIMEOUT = 5.0
SHUTDOWN_TIMEOUT = 2.0           # s for closing connections and listeners on exit
PEERSTORE_ADDR_TTL = 24 * 3600       # seconds; addresses we learn stay usable for a day


class SelfDial(PeerError):
    """The address is this node's own."""


def machine_ipv4_addrs() -> list[str]:
    """This machine's IPv4 addresses: LAN ones first, loopback last, link-local left out."""
    found: list[str] = []
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET:
                    found.append(a.address)
    except Exception:  # no psutil, or a sandbox that hides interfaces
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent for UDP connect
                found.append(s.getsockname()[0])
        except OSError:
            pass
    out: list[str] = []
    for a in found:
        ip = ipaddress.IPv4Address(a)
        if ip.is_link_local or ip.is_unspecified or a in out:
            continue
        out.append(a)
    out.sort(key=lambda a: ipaddress.IPv4Address(a).is_loopback)
    if "127.0.0.1" not in out:
        out.append("127.0.0.1")
    return out


def listen_ip(host: str) -> str:
    """--host as an IP address (a name such as ``localhost`` is resolved, IPv4 first)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise BadRequest(f"p2p listen host {host!r} is not an IP address and does not resolve", param="host") from exc
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return str(infos[0][4][0])


def listen_addrs_for(host: str, port: int) -> list[multiaddr.Multiaddr]:
    """The multiaddrs to listen on for a --host/--p2p-port pair."""
    ip = ipaddress.ip_address(listen_ip(host))
    proto = "ip4" if ip.version == 4 else "ip6"
    return [multiaddr.Multiaddr(f"/{proto}/{ip}/tcp/{port}")]


def _expand_wildcards(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    out: list[multiaddr.Multiaddr] = []
    for addr in candidates:
        ip4 = _value(addr, "ip4")
        if ip4 == "0.0.0.0":
            port = _value(addr, "tcp")
            out.extend(multiaddr.Multiaddr(f"/ip4/{a}/tcp/{port}") for a in machine_ipv4_addrs())
        elif _value(addr, "ip6") == "::":
            continue  # IPv6 wildcard: advertise nothing rather than "::"
        else:
            out.append(addr)
    seen: set[str] = set()
    return [a for a in out if not (str(a) in seen or seen.add(str(a)))]  # type: ignore[func-returns-value]


def _value(addr: multiaddr.Multiaddr, proto: str) -> str | None:
    try:
        return addr.value_for_protocol(proto)
    except Exception:
        return None


def _check_port_free(host: str, port: int) -> None:
    """Fail early and readably: an address not on this machine, or a port another process
    holds (py-libp2p binds with SO_REUSEPORT, which would let two nodes share it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: connections of a previous run in TIME_WAIT are no obstacle; a
        # live listener still is (it holds SO_REUSEPORT, this socket does not).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BadRequest(f"p2p port {host}:{port} is already in use (another node?)", param="p2p_port") from exc
            raise BadRequest(f"cannot listen on {host}:{port}: {exc.strerror}", param="p2p_port") from exc


def split_peer_addr(addr: str | multiaddr.Multiaddr) -> tuple[multiaddr.Multiaddr, ID | None]:
    """``/ip4/.../tcp/N[/p2p/<id>]`` -> (transport address, peer id or None)."""
    try:
        ma = multiaddr.Multiaddr(str(addr))
    except Exception as exc:
        raise BadRequest(f"not a multiaddr: {addr!r} (e.g. /ip4/10.0.0.2/tcp/4001/p2p/<peer id>)",
                         param="peer") from exc
    pid = _value(ma, "p2p")
    if pid is None:
        return ma, None
    try:
        peer = ID.from_base58(pid)
    except Exception as exc:
        raise BadRequest(f"bad peer id in {addr!r}", param="peer") from exc
    return ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{pid}")), peer


# ---------------------------------------------------------------------------- the host

def build_host(key_pair: KeyPair, transport: PnetTCP) -> IHost:
    """A configured, not yet running, libp2p host (see the module note for every setting)."""
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    cfg = ConnectionConfig(
        max_connections_per_peer=1,
        max_connections=10_000, min_connections=0, low_watermark=0, high_watermark=10_000,
        inbound_upgrade_timeout=INBOUND_UPGRADE_TIMEOUT,
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        transports=[transport],
        connection_config=cfg,
        addrs_factory=_expand_wildcards,
        disable_identify_address_discovery=True,
    )
    swarm: Any = host.get_network()
    swarm.retry_config = RetryConfig(max_retries=0)  # new_host() takes no retry_config
    return host


@asynccontextmanager
async def open_host(key_pair: KeyPair, psk: bytes | Callable[[], tuple[bytes, Sequence[bytes]]], *, listen_host: str, port: int,
                    on_mismatch: Callable[[tuple[str, int] | None], None]) -> AsyncIterator[IHost]:
    """Run a host listening on ``listen_host:port`` for the duration of the block."""
    addrs = listen_addrs_for(listen_host, port)
    _check_port_free(listen_ip(listen_host), port)
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")   # see "Bulk throughput"
    transport = PnetTCP(psk, on_mismatch)
    host = build_host(key_pair, transport)
    async with trio.open_nursery() as senders:
        transport.attach(senders)
        try:
            async with host.run(listen_addrs=addrs):
                if not host.get_transport_addrs():
                    raise PeerError(f"could not listen on {listen_host}:{port}")
                swarm: Any = host.get_network()
                await swarm.auto_connector.stop()
                try:
                    yield host
                finally:
                    # host.close() closes connections, listeners and transports before it
                    # stops the swarm. Leaving that to host.run()'s exit is not enough: the
                    # swarm's service is cancelled there, its cleanup awaits die on the
                    # cancellation, and the listening socket stays open (a restart on the
                    # same port fails).
                    with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_TIMEOUT):
                        try:
                            await host.close()
                        except Exception as exc:
                            log.debug("closing the libp2p host: %r", exc)
        finally:
            transport.attach(None)
            senders.cancel_scope.cancel()


async def connect_addr(host: IHost, addr: str | multiaddr.Multiaddr) -> ID:
    """Connect to a peer by address (with or without /p2p/<id>); returns its peer id.

    Without a peer id (``--peer /dns4/node1/tcp/4001``: ids are made at first start, so a
    compose file cannot know them) the Noise handshake runs without an expected id and
    tells us who answered. Callers bound this with their own deadline.
    """
    ma, peer = split_peer_addr(addr)
    if peer is None:
        return await _connect_unknown(host, ma)
    if peer == host.get_id():
        raise SelfDial(f"{addr} is this node's own address")
    host.get_peerstore().add_addrs(peer, [ma], PEERSTORE_ADDR_TTL)
    await dial(host, peer, [ma])
    return peer


def _dial_order(addrs: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    seen: set[str] = set()
    out = [a for a in addrs if _value(a, "tcp") and not (str(a) in seen or seen.add(str(a)))]  # type: ignore[func-returns-value]
    return sorted(out, key=lambda a: (_value(a, "ip4") or "").startswith("127."))  # stable: LAN first


async def dial(host: IHost, peer: ID, addrs: Sequence[multiaddr.Multiaddr]) -> None:
    """Connect to ``peer`` unless connected, trying each address in turn.

    py-libp2p's ``dial_peer`` tries only one address per transport class (its "smart
    address selection"), so a peer whose first advertised address is unreachable from
    here (a docker bridge, a second NIC) would never be reached; and it blocks a peer for
    60 s after a failed dial. Dialing address by address avoids both.
    """
    swarm: Any = host.get_network()
    if swarm.get_connections(peer):
        return
    errors: list[str] = []
    for ma in _dial_order(addrs):
        ma = _strip_p2p(ma)
        try:
            await swarm.dial_addr(ma, peer)
            host.get_peerstore().add_addrs(peer, [ma], PEERSTORE_ADDR_TTL)
            return
        except Exception as exc:
            errors.append(f"{ma}: {_reason(exc)}")
            if swarm.get_connections(peer):  # the peer dialed us meanwhile
                return
    if not errors:
        raise PeerError(f"no known address for peer {peer}")
    raise PeerError(f"cannot connect to {peer} ({'; '.join(errors)})")


def _strip_p2p(ma: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    pid = _value(ma, "p2p")
    return ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{pid}")) if pid else ma


async def _connect_unknown(host: IHost, ma: multiaddr.Multiaddr) -> ID:
    swarm: Any = host.get_network()
    transport = swarm.transport_manager.transport_for_dialing(ma)
    if transport is None:
        raise PeerError(f"cannot dial {ma}: unsupported address")
    try:
        raw = await transport.dial(ma)
    except Exception as exc:
        raise PeerError(f"cannot connect to {ma}: {_reason(exc)}") from exc
    try:
        secured = await swarm.upgrader.security_multistream.secure_outbound(raw, None)
        peer = secured.get_remote_peer()
        if peer == host.get_id():
            await secured.close()
            raise SelfDial(f"{ma} is this node's own address")
        if swarm.get_connections(peer):
            await secured.close()
        else:
            muxed = await swarm.upgrader.upgrade_connection(secured, peer)
            await swarm.add_conn(muxed, direction="outbound")
        host.get_peerstore().add_addrs(peer, [ma], PEERSTORE_ADDR_TTL)
        return peer
    except PeerError:
        raise
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            try:
                await raw.close()
            except Exception:
                pass
        if isinstance(exc, Exception):
            raise PeerError(f"cannot connect to {ma}: {_reason(exc)}") from exc
        raise


def _reason(exc: BaseException) -> str:
    """The innermost useful message of a py-libp2p exception chain."""
    msgs = []
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, TokenMismatch):
            return str(e)
        if str(e):
            msgs.append(str(e))
        e = e.__cause__ or e.__context__
    return msgs[-1] if msgs else type(exc).__name__


async def resolve_dns(addr: str) -> str:
    """`/dns4/host/tcp/N/...` -> `/ip4/<address>/tcp/N/...` (libp2p's TCP dials IPs only)."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("dns", "dns4", "dns6"):
        return addr
    family = {"dns4": socket.AF_INET, "dns6": socket.AF_INET6}.get(parts[1], socket.AF_UNSPEC)
    try:
        infos = await trio.socket.getaddrinfo(parts[2], None, family=family, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise PeerError(f"cannot resolve {parts[2]!r} in {addr}: {exc}") from exc
    fam, *_, sockaddr = infos[0]
    parts[1:3] = ["ip6" if fam == socket.AF_INET6 else "ip4", sockaddr[0]]
    return "/".join(parts)
