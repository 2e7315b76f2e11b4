"""Bulk side channel: bytes between two admitted peers over their own TCP connection,
encrypted and authenticated with keys negotiated on an admitted libp2p stream.

Why. py-libp2p costs ~6-8 ms of CPU per MB on each side (64 KiB yamux frames, Noise,
locks, task switches) and ~1.6-2.5 ms per round trip, so a model file crossed at ~80 MB/s
where plain HTTP did ~250 MB/s, and llama.cpp RPC waited a libp2p round trip per peer per
token. This channel moves the same bytes over a plain TCP connection in large AEAD
records: one syscall and one AES-GCM call per MiB.

Handshake. The protocol that wants a channel (mesh/files.py, mesh/tunnel.py) carries it
on its own admitted stream (Noise + PSK + the HMAC admission: only mesh members, and the
stream's peer id is authenticated):

    client -> server   {..., "bulk": {"v": 1, "nonce": 32 random bytes}}
    server -> client   {..., "bulk": {"port": P, "ticket": 32 random bytes, "nonce": 32 random bytes}}

    keys = HKDF-SHA256(ikm = client nonce || server nonce, salt = ticket,
                       info = "mesh-bulk/1" | purpose | client peer id | server peer id)
         -> 32 bytes client->server, 32 bytes server->client (AES-256-GCM)

The client connects to port P at one of the server's advertised addresses and sends the
ticket, in clear, as its first 32 bytes. The server accepts a ticket once, within
TICKET_TTL, and hands the connection to the stream handler that issued it. The nonces
never leave the Noise channel, so the ticket alone gives nothing: a thief who races the
client to the port gets a connection on which it can neither read nor write a record (the
server drops it at its first record), and the real client, whose ticket is then spent,
sees its session fail and moves on (another session or peer; nothing worse than a delay).
A ticket names nothing (no path, no file): what the connection may do is what the issuing
handler decided on the admitted stream.

Records (both directions, each its own key and counter):

    | length (4 bytes, big-endian: ciphertext + tag) | AES-256-GCM(key, nonce = counter, plaintext, aad = length) |

The 96-bit nonce is the record counter, so records cannot be dropped, replayed, reordered
or altered without the next authentication failing, and the connection is closed.
Truncation is the caller's to see: every user of the channel knows how many bytes it
expects. Records carry at most RECORD plaintext bytes; a receiver refuses lengths over
MAX_RECORD before reading them.

Two adapters over one sans-I/O core (`Sealer`, `Opener`): `SyncChannel` (blocking socket,
for worker threads that move files at disk speed: `recv_into` a reused buffer, no copies
but the kernel's) and `TrioChannel` (trio stream, for the RPC tunnel's many small
messages). `run_blocking` runs such a thread and shuts its socket down when the caller is
cancelled, so a blocked thread never holds up a nursery.

Left out on purpose: a separate port range per purpose, NAT traversal (a peer whose bulk
port cannot be reached is used over its libp2p stream instead), and rekeying (a 2^64
record counter outlives any connection).
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import outcome
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesh.errors import PeerError

__all__ = ["RECORD", "MAX_RECORD", "Keys", "derive_keys", "Sealer", "Opener", "SyncChannel",
           "TrioChannel", "BulkServer", "Offer", "client_hello", "connect", "ips_of",
           "run_blocking", "shutdown", "to_blocking", "to_trio", "ChannelBroken"]

log = logging.getLogger("mesh.bulk")

INFO = b"mesh-bulk/1"
NONCE_BYTES = 32
TICKET_BYTES = 32
TAG = 16
RECORD = 1 << 20                 # plaintext bytes per record: ~0.5 ms of AES-GCM here
MAX_RECORD = (4 << 20) + TAG     # the largest ciphertext a receiver accepts
TICKET_TTL = 10.0                # s a ticket waits for its connection
TICKET_READ_TIMEOUT = 5.0        # s a new connection has to present its ticket
CONNECT_TIMEOUT = 3.0            # s per address the client tries
_LEN = struct.Struct(">I")


class ChannelBroken(PeerError):
    """The side channel failed: closed mid-record, a record that does not authenticate,
    a stall, or a socket error."""


# ------------------------------------------------------------------ keys
@dataclass(frozen=True)
class Keys:
    send: bytes
    recv: bytes


def derive_keys(client_nonce: bytes, server_nonce: bytes, ticket: bytes, purpose: str,
                client_id: str, server_id: str, *, client: bool) -> Keys:
    """This side's send and receive keys (see the module note)."""
    info = b"|".join([INFO, purpose.encode(), client_id.encode(), server_id.encode()])
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=ticket, info=info).derive(
        client_nonce + server_nonce)
    c2s, s2c = okm[:32], okm[32:]
    return Keys(send=c2s, recv=s2c) if client else Keys(send=s2c, recv=c2s)


# ------------------------------------------------------------------ records (no I/O)
class Sealer:
    """Plaintext -> records, counter nonces from 0."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._n = 0

    def seal_into(self, data, out: memoryview) -> int:
        """Write one record holding `data` (<= RECORD bytes) at the start of `out`; its size."""
        n = len(data) + TAG
        hdr = _LEN.pack(n)
        out[:4] = hdr
        self._aead.encrypt_into(self._nonce(), data, hdr, out[4:4 + n])
        return 4 + n

    def seal(self, data) -> bytes:
        out = bytearray(4 + len(data) + TAG)
        self.seal_into(data, memoryview(out))
        return bytes(out)

    def _nonce(self) -> bytes:
        nonce = self._n.to_bytes(12, "big")
        self._n += 1
        return nonce


class Opener:
    """Records -> plaintext; any failure is ChannelBroken."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._n = 0

    @staticmethod
    def length(hdr) -> int:
        (n,) = _LEN.unpack(hdr)
        if not TAG <= n <= MAX_RECORD:
            raise ChannelBroken(f"bad record length {n}")
        return n

    def open_into(self, hdr, ct, out: memoryview) -> int:
        """Authenticate and decrypt one record's ciphertext into `out`; the plaintext size."""
        try:
            self._aead.decrypt_into(self._n.to_bytes(12, "big"), ct, bytes(hdr), out[:len(ct) - TAG])
        except InvalidTag:
            raise ChannelBroken("a record failed authentication") from None
        self._n += 1
        return len(ct) - TAG

    def open(self, hdr, ct) -> bytes:
        out = bytearray(len(ct) - TAG)
        self.open_into(hdr, ct, memoryview(out))
        return bytes(out)


# ------------------------------------------------------------------ blocking adapter
class SyncChannel:
    """Records over a blocking socket (worker threads). Every wait is bounded by `timeout`
    (or by the caller's `shutdown`)."""

    def __init__(self, sock: socket.socket, keys: Keys | None, *, timeout: float | None,
                 codec: tuple[Sealer, Opener] | None = None) -> None:
        """`timeout` None: waits are not bounded (the caller aborts with `shutdown`);
        `codec`: carry on another adapter's records (TrioChannel.to_sync)."""
        self.sock = sock
        sock.settimeout(timeout)
        self._sealer, self._opener = codec or (Sealer(keys.send), Opener(keys.recv))
        self._out = bytearray(4 + RECORD + TAG)
        self._hdr = bytearray(4)
        self._ct = bytearray(MAX_RECORD)

    def send(self, data) -> None:
        view = memoryview(data)
        out = memoryview(self._out)
        for i in range(0, max(1, len(view)), RECORD):
            n = self._sealer.seal_into(view[i:i + RECORD], out)
            try:
                self.sock.sendall(out[:n])
            except OSError as exc:
                raise ChannelBroken(f"side channel: {_reason(exc)}") from exc

    def recv_into(self, out: memoryview) -> int:
        """One record's plaintext into `out` (room for RECORD bytes); 0 at a clean EOF."""
        if not self._fill(memoryview(self._hdr), eof_ok=True):
            return 0
        n = self._opener.length(self._hdr)
        ct = memoryview(self._ct)[:n]
        self._fill(ct, eof_ok=False)
        return self._opener.open_into(self._hdr, ct, out)

    def send_eof(self) -> None:
        """Half-close: the far side reads a clean EOF after the records sent so far."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def recv(self) -> bytes:
        buf = bytearray(RECORD)
        n = self.recv_into(memoryview(buf))
        return bytes(buf[:n])

    def _fill(self, view: memoryview, *, eof_ok: bool) -> bool:
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except OSError as exc:
                raise ChannelBroken(f"side channel: {_reason(exc)}") from exc
            if n == 0:
                if got == 0 and eof_ok:
                    return False
                raise ChannelBroken("side channel closed mid-record")
            got += n
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no data within the stall timeout"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


async def run_blocking(fn: Callable[..., Any], *args: Any, abort: Callable[[], None],
                       own_thread: bool = False) -> Any:
    """`fn(*args)` in a worker thread; if we are cancelled meanwhile, `abort()` is called
    (e.g. `shutdown` of the socket the thread blocks on), so the thread ends at once and
    never holds up the caller's nursery. `own_thread`: outside trio's shared thread limit
    (a thread that lives as long as a connection must not starve short jobs)."""
    finished = False

    async def abort_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not finished:
                abort()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(abort_on_cancel)
        # the thread's outcome, unwrapped outside the nursery (no exception group)
        result = await trio.to_thread.run_sync(
            outcome.capture, fn, *args, limiter=trio.CapacityLimiter(1) if own_thread else None)
        finished = True
        nursery.cancel_scope.cancel()
    return result.unwrap()


def shutdown(sock: socket.socket) -> Callable[[], None]:
    """An `abort` for run_blocking: shut `sock` down both ways."""
    def abort() -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    return abort


def to_blocking(stream: trio.SocketStream) -> socket.socket:
    """The stream's socket as a blocking stdlib socket (the trio stream is spent)."""
    fd = stream.socket.detach()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock


def to_trio(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


# ------------------------------------------------------------------ trio adapter
class TrioChannel:
    """Records over a trio stream (the RPC tunnel: many small messages)."""

    def __init__(self, stream: trio.SocketStream, keys: Keys) -> None:
        self.stream = stream
        self._sealer = Sealer(keys.send)
        self._opener = Opener(keys.recv)
        self._buf = bytearray()

    async def send(self, data) -> None:
        view = memoryview(data)
        try:
            for i in range(0, max(1, len(view)), RECORD):
                await self.stream.send_all(self._sealer.seal(view[i:i + RECORD]))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ChannelBroken(f"side channel: {exc or type(exc).__name__}") from exc

    async def recv(self) -> bytes:
        """One record's plaintext; b"" at a clean EOF between records."""
        if not await self._fill(4, eof_ok=True):
            return b""
        n = self._opener.length(self._buf[:4])
        await self._fill(4 + n, eof_ok=False)
        hdr, ct = bytes(self._buf[:4]), bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        return self._opener.open(hdr, ct)

    async def _fill(self, size: int, *, eof_ok: bool) -> bool:
        while len(self._buf) < size:
            try:
                data = await self.stream.receive_some(max(1 << 16, size - len(self._buf)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelBroken(f"side channel: {exc or type(exc).__name__}") from exc
            if not data:
                if not self._buf and eof_ok:
                    return False
                raise ChannelBroken("side channel closed mid-record")
            self._buf += data
        return True

    def to_sync(self) -> SyncChannel:
        """The same channel (keys, record counters) as a blocking SyncChannel with no
        timeout; this one is spent."""
        if self._buf:
            raise ChannelBroken("side channel: records came before the hand-over")
        return SyncChannel(to_blocking(self.stream), None, timeout=None,
                           codec=(self._sealer, self._opener))

    async def send_eof(self) -> None:
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


# ------------------------------------------------------------------ server
class Offer:
    """A ticket issued to one peer on an admitted stream; `accept` waits for its connection."""

    def __init__(self, ticket: bytes, nonce: bytes, keys: Keys, port: int, expires: float) -> None:
        self.ticket, self.nonce, self.keys, self.port, self.expires = ticket, nonce, keys, port, expires
        self._send, self._recv = trio.open_memory_channel[socket.socket](1)

    @property
    def wire(self) -> dict:
        return {"port": self.port, "ticket": self.ticket, "nonce": self.nonce}

    def withdraw(self, server: "BulkServer") -> None:
        """The client will not come (it uses its stream): forget the ticket."""
        server._pending.pop(self.ticket, None)
        self._recv.close()

    async def accept(self, server: "BulkServer") -> socket.socket | None:
        """The client's connection (ticket already read) as a blocking socket the caller
        owns (`to_trio` for a trio stream), or None if it did not come within TICKET_TTL."""
        try:
            with trio.move_on_at(self.expires):
                return await self._recv.receive()
            return None
        finally:
            server._pending.pop(self.ticket, None)
            try:                         # delivered as we gave up: nobody will use it
                late = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                late = None
            self._recv.close()
            if late is not None:
                late.close()


class BulkServer:
    """The node's side-channel listener: connections that present a ticket issued by one
    of its stream handlers (`offer`)."""

    def __init__(self, *, host: str, port: int = 0, peer_id: str = "") -> None:
        self.host = host
        self.want_port = port
        self.peer_id = peer_id
        self.port: int | None = None
        self._pending: dict[bytes, Offer] = {}

    def offer(self, peer_id: str, purpose: str, hello: Any) -> Offer | None:
        """A ticket for `peer_id`'s channel, or None when the request carries no valid
        client hello or this server does not listen."""
        client_nonce = hello.get("nonce") if isinstance(hello, dict) and hello.get("v") == 1 else None
        if self.port is None or not isinstance(client_nonce, bytes) or len(client_nonce) != NONCE_BYTES:
            return None
        ticket, nonce = secrets.token_bytes(TICKET_BYTES), secrets.token_bytes(NONCE_BYTES)
        keys = derive_keys(client_nonce, nonce, ticket, purpose, peer_id, self.peer_id, client=False)
        offer = Offer(ticket, nonce, keys, self.port, trio.current_time() + TICKET_TTL)
        self._pending[ticket] = offer
        return offer

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on (host, port) and route connections to their tickets; never returns.
        If the port cannot be bound, logs it and serves nothing (handlers then answer
        without a side channel)."""
        try:
            listeners = await trio.open_tcp_listeners(self.want_port, host=self.host)
        except OSError as exc:
            log.warning("bulk side channel off: cannot listen on %s:%s: %s", self.host,
                        self.want_port, exc)
            task_status.started(self)
            await trio.sleep_forever()
        self.port = listeners[0].socket.getsockname()[1]
        log.info("bulk side channel on %s:%s", self.host, self.port)
        task_status.started(self)
        try:
            await trio.serve_listeners(self._route, listeners)
        finally:
            self.port = None

    async def _route(self, conn: trio.SocketStream) -> None:
        ticket = b""
        with trio.move_on_after(TICKET_READ_TIMEOUT):
            try:
                while len(ticket) < TICKET_BYTES:
                    data = await conn.receive_some(TICKET_BYTES - len(ticket))
                    if not data:
                        break
                    ticket += data
            except (trio.BrokenResourceError, OSError):
                pass
        offer = self._pending.pop(ticket, None) if len(ticket) == TICKET_BYTES else None
        if offer is None or trio.current_time() > offer.expires:
            await conn.aclose()
            return
        _nodelay(conn.socket)
        sock = to_blocking(conn)     # trio closes `conn` when we return: the fd moves out
        try:
            offer._send.send_nowait(sock)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            sock.close()


# ------------------------------------------------------------------ client
def client_hello() -> tuple[bytes, dict]:
    """(our nonce, the `bulk` field of a request that asks for a side channel)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, {"v": 1, "nonce": nonce}


def ips_of(addrs: list[str]) -> list[str]:
    """Hosts of multiaddrs (/ip4/A/..., /ip6/A/..., /dns4/NAME/...), in order, once each."""
    out: list[str] = []
    for a in addrs:
        parts = str(a).split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns4", "dns6", "dns") and parts[2] not in out:
            out.append(parts[2])
    return out


async def connect(hosts: list[str], reply: Any, client_nonce: bytes, purpose: str,
                  client_id: str, server_id: str) -> tuple[trio.SocketStream, Keys]:
    """Open the side channel a server offered (`reply` is its `bulk` field). PeerError
    when the offer is malformed or no address answers."""
    if not isinstance(reply, dict):
        raise ChannelBroken("the peer offered no side channel")
    port, ticket, nonce = reply.get("port"), reply.get("ticket"), reply.get("nonce")
    if (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536
            or not isinstance(ticket, bytes) or len(ticket) != TICKET_BYTES
            or not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES):
        raise ChannelBroken("the peer's side-channel offer is malformed")
    keys = derive_keys(client_nonce, nonce, ticket, purpose, client_id, server_id, client=True)
    errors = []
    for host in hosts:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                conn = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            errors.append(f"{host}:{port}: {exc or 'timeout'}")
            continue
        _nodelay(conn.socket)
        try:
            await conn.send_all(ticket)
        except (trio.BrokenResourceError, OSError) as exc:
            await conn.aclose()
            errors.append(f"{host}:{port}: {exc}")
            continue
        return conn, keys
    raise ChannelBroken("cannot reach the peer's side channel: " + ("; ".join(errors) or "no address"))


def _nodelay(sock) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
