"""The mesh's private network: a TCP transport that only lets in holders of the token.

Private network (pnet). py-libp2p's own pnet (``psk=``) is XSalsa20 over the stream with
no key check: with a wrong key both ends read noise until a 10-30 s timeout (measured:
a wrong-token dial did not fail within 40 s with default retries). ``PnetTCP`` does the
same job with a key check: each side first sends a 12-byte random nonce and a 16-byte
magic encrypted with ChaCha20(psk, nonce); a receiver that cannot decrypt the magic
knows at once that the peer holds another token, records it (``on_mismatch``) and
closes. A wrong token is therefore refused in one round trip on both sides. The cipher
only hides and gates; integrity and peer authentication come from Noise above it. It is
not wire-compatible with go-libp2p's pnet, which is fine: only our nodes speak it.

Keys. The psk comes from a function called per connection, ``psks() -> (send, accepted)``
(mesh/token.py ``MeshSecrets.psks``): a node encrypts with ``send`` and tries each of
``accepted`` on the peer's preamble (a 16-byte decrypt each), so during a token rotation's
grace period connections from holders of either token get in.

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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import multiaddr
import trio
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.transport.tcp.tcp import TCP, TCPListener


__all__ = ["PnetTCP", "TokenMismatch"]

log = logging.getLogger(__name__)

_PNET_MAGIC = b"mesh/pnet/1\x00\x00\x00\x00\x00"   # 16 bytes
_PNET_NONCE = 12
WRITE_BEHIND_HIGH = 32 * 2**20   # bytes queued per connection before write() waits
WRITE_BEHIND_LOW = 8 * 2**20     # ... until the queue is down to this
CLOSE_FLUSH_TIMEOUT = 0.5        # s a closing connection waits for its queue to leave
READ_AHEAD = 256 * 1024          # bytes asked of the socket per read (see "Bulk throughput")


class TokenMismatch(IOException):
    """The other end of a connection holds a different mesh token."""


def _chacha(key: bytes, nonce: bytes) -> Any:
    # cryptography's ChaCha20 takes a 16-byte "nonce" = 4-byte LE block counter + 12-byte nonce.
    return Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce), mode=None).encryptor()


class _PnetStream(ReadWriteCloser):
    """A byte stream wrapped in the mesh pnet cipher, with write-behind (see the module note).

    ``write`` encrypts and queues; a sender task (one per connection, in the nursery of
    ``open_host``) drains the queue to the socket in order. Without a sender (no nursery
    attached) writes go straight to the socket.
    """

    def __init__(self, inner: ReadWriteCloser, psks: tuple[bytes, Sequence[bytes]],
                 on_mismatch: Callable[[tuple[str, int] | None], None], *, write_behind: bool) -> None:
        self._inner = inner
        self._psk, self._accepted = psks[0], list(psks[1]) or [psks[0]]
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
        for psk in self._accepted:
            dec = _chacha(psk, buf[:_PNET_NONCE])
            if dec.update(buf[_PNET_NONCE:need]) == _PNET_MAGIC:
                break
        else:
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

    def __init__(self, psk: bytes | Callable[[], tuple[bytes, Sequence[bytes]]],
                 on_mismatch: Callable[[tuple[str, int] | None], None]) -> None:
        super().__init__()
        if isinstance(psk, bytes):
            if len(psk) != 32:
                raise ValueError("psk must be 32 bytes")
            fixed = (psk, [psk])
            self._psks: Callable[[], tuple[bytes, Sequence[bytes]]] = lambda: fixed
        else:
            self._psks = psk
        self._on_mismatch = on_mismatch
        self._senders: trio.Nursery | None = None

    def attach(self, senders: trio.Nursery | None) -> None:
        """Where connection sender tasks run (``open_host`` owns it); None: direct writes."""
        self._senders = senders

    def _wrap(self, rwc: ReadWriteCloser) -> _PnetStream:
        stream = _PnetStream(rwc, self._psks(), self._on_mismatch, write_behind=self._senders is not None)
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
