"""The libp2p host: TCP + private-network key + Noise + yamux, configured for a LAN mesh.

Stack, bottom up: TCP -> mesh pnet (PSK from the token) -> Noise (the only security
protocol offered) -> yamux. Everything here is py-libp2p 0.8.1 configuration, plus two
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

Private network (pnet). py-libp2p's own pnet (``psk=``) is XSalsa20 over the stream with
no key check: with a wrong key both ends read noise until a 10-30 s timeout (measured:
a wrong-token dial did not fail within 40 s with default retries). ``PnetTCP`` does the
same job with a key check: each side first sends a 12-byte random nonce and a 16-byte
magic encrypted with ChaCha20(psk, nonce); a receiver that cannot decrypt the magic
knows at once that the peer holds another token, records it (``on_mismatch``) and
closes. A wrong token is therefore refused in one round trip on both sides. The cipher
only hides and gates; integrity and peer authentication come from Noise above it. It is
not wire-compatible with go-libp2p's pnet, which is fine: only our nodes speak it.

Write-behind. py-libp2p's yamux answers pings and acknowledges new streams from its
read loop, through the same lock as data writes. When both ends push bulk data at once,
each end's data writer blocks on a full TCP buffer while holding that lock, each read loop
then blocks on the lock (a ping arrives: yamux pings 0.5 s after connecting, then every
30 s) and stops reading, and the connection deadlocks for good (seen in about 1 of 25
10 MiB echo runs). So the pnet layer never blocks a writer on the socket: ``write``
encrypts and queues, and one sender task per connection (in ``open_host``'s nursery)
drains the queue in order. Memory stays bounded by yamux's per-stream windows; past
``WRITE_BEHIND_HIGH`` queued bytes a writer waits for the queue to drain to
``WRITE_BEHIND_LOW``. Batching the queue into one send also cuts syscalls for the many
small frames of token streams.

Bulk throughput (mesh/files.py moves model files over streams). Two settings took a
98 MB peer fetch on loopback, two processes on a busy 2-core machine, from ~43 to ~62 MB/s
(medians of 6-9 alternated runs; a bare one-way stream went from ~23 to ~45 MiB/s).
- Read-ahead: ``_PnetStream.read`` receives up to ``READ_AHEAD`` (256 KiB) per syscall and
  serves later reads from that buffer. Noise reads a 2-byte length and then its message,
  yamux a 12-byte header and then its body, so unbuffered reads were ~14 KiB recv calls.
- ``PY_YAMUX_RELEASE_ON_READ=0`` (py-libp2p's own tuning switch, read at call time; set by
  ``open_host`` unless the environment sets it): the receiver sends a yamux window update
  when half its window is consumed (go-yamux's rule), not after every read. The default
  sent one ~30-byte window update (a Noise message and a socket send) per ~14 KiB read.

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
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP, TCPListener

from mesh.errors import BadRequest, PeerError

__all__ = [
    "PnetTCP", "TokenMismatch", "SelfDial", "build_host", "open_host", "listen_ip", "listen_addrs_for",
    "machine_ipv4_addrs", "connect_addr", "dial", "split_peer_addr",
]

log = logging.getLogger(__name__)

INBOUND_UPGRADE_TIMEOUT = 5.0
SHUTDOWN_TIMEOUT = 2.0           # s for closing connections and listeners on exit
PEERSTORE_ADDR_TTL = 24 * 3600       # seconds; addresses we learn stay usable for a day
_PNET_MAGIC = b"mesh/pnet/1\x00\x00\x00\x00\x00"   # 16 bytes
_PNET_NONCE = 12
WRITE_BEHIND_HIGH = 32 * 2**20   # bytes queued per connection before write() waits
WRITE_BEHIND_LOW = 8 * 2**20     # ... until the queue is down to this
CLOSE_FLUSH_TIMEOUT = 0.5        # s a closing connection waits for its queue to leave
READ_AHEAD = 256 * 1024          # bytes asked of the socket per read (see "Bulk throughput")


class TokenMismatch(IOException):
    """The other end of a connection holds a different mesh token."""


class SelfDial(PeerError):
    """The address is this node's own."""


def _chacha(key: bytes, nonce: bytes) -> Any:
    # cryptography's ChaCha20 takes a 16-byte "nonce" = 4-byte LE block counter + 12-byte nonce.
    return Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce), mode=None).encryptor()


class _PnetStream(ReadWriteCloser):
    """A byte stream wrapped in the mesh pnet cipher, with write-behind (see the module note).

    ``write`` encrypts and queues; a sender task (one per connection, in the nursery of
    ``open_host``) drains the queue to the socket in order. Without a sender (no nursery
    attached) writes go straight to the socket.
    """

    def __init__(self, inner: ReadWriteCloser, psk: bytes,
                 on_mismatch: Callable[[tuple[str, int] | None], None], *, write_behind: bool) -> None:
        self._inner = inner
        self._psk = psk
        self._on_mismatch = on_mismatch
        self._enc: Any = None
        self._dec: Any = None
        self._rlock = trio.Lock()
        self._rbuf: memoryview | None = None   # decrypted bytes read ahead, not yet consumed
        self._wlock = trio.Lock()          # direct mode only
        self._write_behind = write_behind
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._wake_sender = trio.Event()
        self._below_low = trio.Event()
        self._below_low.set()
        self._idle = trio.Event()           # set while nothing is queued or being sent
        self._idle.set()
        self._error: BaseException | None = None
        self._closed = False
        # Cached now: after a peer with another token hangs up, getpeername() fails.
        try:
            self._remote_addr: tuple[str, int] | None = inner.get_remote_address()
        except Exception:
            self._remote_addr = None

    # ---------------------------------------------------------------- writing
    def _encrypt(self, data: bytes) -> bytes:
        if self._enc is None:
            nonce = os.urandom(_PNET_NONCE)
            self._enc = _chacha(self._psk, nonce)
            return nonce + self._enc.update(_PNET_MAGIC) + self._enc.update(data)
        return self._enc.update(data)

    async def write(self, data: bytes) -> None:
        if self._error is not None or self._closed:
            raise ConnectionClosedError(f"connection closed ({self._error or 'locally'})", transport="tcp")
        if not self._write_behind:
            async with self._wlock:
                await self._inner.write(self._encrypt(data))
            return
        self._queue(self._encrypt(data))
        if self._out_bytes > WRITE_BEHIND_HIGH:
            await self._below_low.wait()
        else:
            # A scheduling point that cannot be cancelled: the bytes are already queued.
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _queue(self, chunk: bytes) -> None:
        self._out.append(chunk)
        self._out_bytes += len(chunk)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        if self._out_bytes > WRITE_BEHIND_HIGH and self._below_low.is_set():
            self._below_low = trio.Event()
        self._wake_sender.set()

    async def serve_sender(self) -> None:
        """Drain the queue to the socket until closed; never raises."""
        try:
            while True:
                await self._wake_sender.wait()
                self._wake_sender = trio.Event()
                while self._out:
                    chunk = b"".join(self._out)
                    self._out.clear()
                    await self._inner.write(chunk)
                    self._out_bytes -= len(chunk)
                    if self._out_bytes <= WRITE_BEHIND_LOW:
                        self._below_low.set()
                self._idle.set()
                if self._closed:
                    return
        except BaseException as exc:  # Cancelled included: wake every waiter, then go
            self._error = exc if not isinstance(exc, trio.Cancelled) else ConnectionClosedError("shut down")
            self._out.clear()
            self._below_low.set()
            self._idle.set()
            if isinstance(exc, trio.Cancelled):
                raise
            log.debug("pnet sender for %s ended: %r", self._remote_addr, exc)

    # ---------------------------------------------------------------- reading
    async def _read_preamble(self) -> None:
        # Send ours first, so a peer with another token learns it too, then check theirs.
        if self._enc is None:
            await self.write(b"")
        need = _PNET_NONCE + len(_PNET_MAGIC)
        buf = b""
        while len(buf) < need:
            chunk = await self._inner.read(need - len(buf))
            if not chunk:
                raise IOException("connection closed during the private-network preamble")
            buf += chunk
        dec = _chacha(self._psk, buf[:_PNET_NONCE])
        if dec.update(buf[_PNET_NONCE:need]) != _PNET_MAGIC:
            addr = self._remote_addr
            self._on_mismatch(addr)
            await self.close()
            raise TokenMismatch(f"peer at {addr} holds a different mesh token")
        self._dec = dec

    async def read(self, n: int | None = None) -> bytes:
        async with self._rlock:
            if self._dec is None:
                await self._read_preamble()
            buf = self._rbuf
            if not buf:
                data = await self._inner.read(max(n or 0, READ_AHEAD))
                if not data:
                    return b""
                buf = memoryview(self._dec.update(data))
            if n is None or n >= len(buf):
                self._rbuf = None
                return bytes(buf)
            self._rbuf = buf[n:]
            return bytes(buf[:n])

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake_sender.set()
            # Let queued frames (a GO_AWAY, a last answer) leave, briefly.
            with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                await self._idle.wait()
        await self._inner.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._remote_addr or self._inner.get_remote_address()

    def __getattr__(self, name: str) -> Any:  # get_local_address & co. of the TCP stream
        return getattr(self._inner, name)


class PnetTCP(TCP):
    """TCP whose every connection, dialed or accepted, is wrapped in the mesh pnet."""

    def __init__(self, psk: bytes, on_mismatch: Callable[[tuple[str, int] | None], None]) -> None:
        super().__init__()
        if len(psk) != 32:
            raise ValueError("psk must be 32 bytes")
        self._psk = psk
        self._on_mismatch = on_mismatch
        self._senders: trio.Nursery | None = None

    def attach(self, senders: trio.Nursery | None) -> None:
        """Where connection sender tasks run (``open_host`` owns it); None: direct writes."""
        self._senders = senders

    def _wrap(self, rwc: ReadWriteCloser) -> _PnetStream:
        stream = _PnetStream(rwc, self._psk, self._on_mismatch, write_behind=self._senders is not None)
        if self._senders is not None:
            self._senders.start_soon(stream.serve_sender)
        return stream

    async def dial(self, maddr: multiaddr.Multiaddr) -> RawConnection:  # type: ignore[override]
        raw = await super().dial(maddr)
        assert isinstance(raw, RawConnection)
        return RawConnection(self._wrap(raw.stream), True)

    async def dial_with_source(self, maddr: multiaddr.Multiaddr,  # type: ignore[override]
                               source: tuple[str, int]) -> RawConnection:
        raw = await super().dial_with_source(maddr, source)
        assert isinstance(raw, RawConnection)
        return RawConnection(self._wrap(raw.stream), True)

    def create_listener(self, handler_function: Any) -> TCPListener:
        async def wrapped(rwc: ReadWriteCloser) -> None:
            await handler_function(self._wrap(rwc))

        return TCPListener(wrapped)


# ---------------------------------------------------------------------------- addresses

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
async def open_host(key_pair: KeyPair, psk: bytes, *, listen_host: str, port: int,
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
