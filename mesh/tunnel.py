"""`/mesh/rpc/1`: llama.cpp RPC traffic carried over the mesh.

llama.cpp's RPC server has no authentication, so it listens on 127.0.0.1 only
(node/rpc_server.py) and peers reach it through this protocol, on admitted, Noise + PSK
libp2p connections:

    loading node                                         lending node
    worker --TCP--> 127.0.0.1:L  ==libp2p stream==>  handler --TCP--> 127.0.0.1:RPC
                    (serve_tunnel, one per peer)      (make_handler)

Each accepted local connection gets its own stream; the bytes are raw RPC, no framing.
`serve_tunnel` listens on loopback only; the handler refuses streams when this node lends
nothing.

Throughput and latency: each direction is one task reading up to BUFFER bytes and writing
them in one call. While a write waits (yamux window, Noise), new bytes pile up in the
socket or stream buffer and go out in the next read, so small RPC messages are coalesced
exactly when the link is the bottleneck, and never delayed when it is not; after a read
wakes, whatever else the local socket already holds is taken too (llama.cpp writes one
message in two or three send() calls). Each py-libp2p write and read costs ~0.2-0.4 ms of
Python, and llama.cpp waits for one round trip per peer per token, so fewer, larger
writes are what matters. TCP_NODELAY on the local sockets (llama.cpp sets it too).

Half-close: EOF on one side is passed on as EOF (`Stream.close()` / `send_eof()`), so the
RPC server sees its client leave and frees the client's buffers. A stream that breaks, or
a server that closes while the client still talks, aborts both sides at once; on the
loading node `on_broken(reason)` is called *before* the local socket is closed, so the
node can fail the model's requests with the reason before the worker notices (llama.cpp's
RPC client aborts its process on a dead connection).

One client at a time: the RPC server serves one connection and queues the rest. The
handler gives the server to one origin peer at a time (`Lender`, gossiped as
`rpc.used_by`); the holder keeps it for HOLD_AFTER seconds after its last stream, since
llama.cpp opens a few short connections in a row while it loads. A stream from another
peer waits up to BUSY_WAIT for it and is then reset.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from mesh.errors import MeshError, PeerError

__all__ = ["PROTOCOL", "BUFFER", "TunnelStats", "serve_tunnel", "make_handler", "Lender",
           "RpcBatcher"]

log = logging.getLogger("mesh.tunnel")

PROTOCOL = "/mesh/rpc/1"
BUFFER = 1 << 20            # bytes per read: a weight upload moves in MiB-sized writes
BUSY_WAIT = 3.0             # s a second origin waits for the RPC server before a reset
HOLD_AFTER = 5.0            # s the holder keeps the server after its last stream
CONNECT_TIMEOUT = 5.0       # s to reach the local RPC server


@dataclass
class TunnelStats:
    """Bytes through one tunnel (the loading node's side)."""
    sent: int = 0
    received: int = 0
    streams: int = 0
    open: int = 0


class _Broken(Exception):
    pass


def _nodelay(tcp: trio.SocketStream) -> None:
    try:
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _read_ready(fd: int, data: bytes) -> tuple[bytes, bool]:
    """`data` plus whatever else the socket already holds, without waiting; (bytes, eof).

    llama.cpp sends a message in several send() calls (command byte, size, payload; a
    reply's size, then payload), so the read that wakes us often holds only the first
    piece while the rest is already behind it: one py-libp2p write instead of three."""
    parts = [data]
    size = len(data)
    while size < BUFFER:
        try:
            more = os.read(fd, BUFFER - size)
        except BlockingIOError:
            break
        except OSError as exc:
            raise _Broken(f"local socket: {exc}") from exc
        if not more:
            return b"".join(parts), True
        parts.append(more)
        size += len(more)
    return (b"".join(parts) if len(parts) > 1 else data), False


# llama.cpp RPC protocol 7 (ggml-rpc.cpp in llama-cpp-python 0.3.36): a request is
# cmd (1 byte) | size (8 bytes, little-endian) | payload. The commands the server answers;
# every other known one (SET_TENSOR, GRAPH_COMPUTE, GRAPH_RECOMPUTE, FREE_BUFFER,
# BUFFER_CLEAR, INIT_TENSOR, MEMSET_TENSOR) gets no answer, so the client never waits
# right after one of those.
RPC_ANSWERED = frozenset({0, 1, 2, 3, 7, 8, 9, 11, 13, 14, 15})
RPC_COMMANDS = 18            # RPC_CMD_COUNT - 1 (RPC_CMD_NONE never goes on the wire)
HOLD_MAX = 0.002             # s a fire-and-forget command may wait for company


class RpcBatcher:
    """Holds RPC bytes until the far side can act on them.

    Requests (the loading node's side): per token, llama.cpp sends each peer several inputs
    (SET_TENSOR), GRAPH_RECOMPUTE, then GET_TENSOR, in quick succession, and waits only for
    the last one's answer; sent one by one, each costs a py-libp2p write and read (~0.3-0.7
    ms each here). Held until the GET_TENSOR is complete, they cross in one write, and the
    server loses nothing (it could not answer earlier anyway). Replies (`replies=True`, the
    lending node's side: size (8 bytes) | payload, written by the server in two send()
    calls): held until the reply is whole. Anything unexpected (a command number this
    protocol does not have) turns holding off for the connection; a caller flushes what is
    held after HOLD_MAX without new bytes, and at EOF."""

    def __init__(self, *, replies: bool = False) -> None:
        self.replies = replies
        self._hlen = 8 if replies else 9
        self.enabled = True
        self._held: list[bytes] = []
        self._size = 0
        self._header = b""
        self._cmd = -1
        self._remaining = 0

    @property
    def holding(self) -> bool:
        return self._size > 0

    def take(self) -> bytes:
        data = b"".join(self._held)
        self._held, self._size = [], 0
        return data

    def feed(self, data: bytes) -> bytes | None:
        """Bytes to send now (everything held so far), or None to keep holding."""
        self._held.append(data)
        self._size += len(data)
        if not self.enabled:
            return self.take()
        flush = False
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                step = min(self._remaining, n - i)
                i += step
                self._remaining -= step
                if self._remaining == 0 and self._cmd in RPC_ANSWERED:
                    flush = True
                continue
            need = self._hlen - len(self._header)
            self._header += data[i:i + need]
            i += min(need, n - i)
            if len(self._header) < self._hlen:
                break
            self._cmd = 14 if self.replies else self._header[0]   # a reply: "answered"
            self._remaining = int.from_bytes(self._header[-8:], "little")
            self._header = b""
            if self._cmd >= RPC_COMMANDS:
                self.enabled = False
                return self.take()
            if self._remaining == 0 and self._cmd in RPC_ANSWERED:
                flush = True
        if flush or self._size >= BUFFER:
            return self.take()
        return None


async def _batched_to_stream(tcp: trio.SocketStream, stream, count: Callable[[int], None],
                             on_eof: Callable[[], None], *, replies: bool) -> None:
    """Local socket -> stream, in whole RPC messages (RpcBatcher)."""
    fd = tcp.socket.fileno()
    batcher = RpcBatcher(replies=replies)
    while True:
        data = None
        try:
            if batcher.holding:
                with trio.move_on_after(HOLD_MAX):
                    data = await tcp.receive_some(BUFFER)
            else:
                data = await tcp.receive_some(BUFFER)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Broken(f"local socket: {exc}") from exc
        if data is None:                      # held long enough: send it
            out = batcher.take()
            count(len(out))
            await stream.write(out)
            continue
        eof = not data
        if data:
            data, eof = _read_ready(fd, data)
            out = batcher.feed(data)
            if out is None and eof:
                out = batcher.take()
            if out:
                count(len(out))
                await stream.write(out)
        if eof:
            on_eof()
            await stream.close()              # half-close: the far side reads EOF
            return


async def _stream_to_tcp(stream, tcp: trio.SocketStream, count: Callable[[int], None],
                         on_eof: Callable[[], None] = lambda: None) -> bool:
    """True when the stream ended with a clean EOF."""
    while True:
        data = await stream.read(BUFFER)
        if not data:
            on_eof()
            try:
                await tcp.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            return True
        count(len(data))
        try:
            await tcp.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Broken(f"local socket: {exc}") from exc


# ------------------------------------------------------------------ loading node
async def serve_tunnel(p2p, peer_id: str, *, on_broken: Callable[[str], None],
                       stats: TunnelStats | None = None,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on 127.0.0.1 (a free port, passed to `task_status.started`) and carry every
    connection to `peer_id`'s RPC server. Never returns; cancel it to close the tunnel
    (open connections are reset)."""
    stats = stats if stats is not None else TunnelStats()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    name = peer_id[-8:]

    async def one(tcp: trio.SocketStream) -> None:
        _nodelay(tcp)
        stats.streams += 1
        stats.open += 1
        stream = None
        client_done = False
        try:
            try:
                stream = await p2p.open_stream(peer_id, PROTOCOL)
            except MeshError as exc:
                on_broken(f"cannot open the RPC tunnel to peer {name}: {exc.message}")
                return

            def sent(n: int) -> None:
                stats.sent += n

            def received(n: int) -> None:
                stats.received += n

            def client_left() -> None:
                nonlocal client_done
                client_done = True

            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(_batched_to_stream, tcp, stream, sent, client_left,
                                           replies=False))
                await _stream_to_tcp(stream, tcp, received)
                if not client_done:
                    # the server side ended while its client still talks: it died
                    on_broken(f"peer {name} closed the RPC connection (its RPC server "
                              "or node went away)")
                    nursery.cancel_scope.cancel()
        except* PeerError as group:
            if not client_done:
                on_broken(f"the RPC tunnel to peer {name} broke: {group.exceptions[0].message}")
        except* _Broken:
            pass    # our side (the model's worker) went away: its supervisor knows
        except* Exception as group:     # a bug here must not take the node down
            log.error("RPC tunnel to %s failed", name, exc_info=group)
            if not client_done:
                on_broken(f"the RPC tunnel to peer {name} failed: {group.exceptions[0]!r}")
        finally:
            stats.open -= 1
            if stream is not None and not stream.ended:
                await stream.reset()
            with trio.CancelScope(shield=True):
                await tcp.aclose()

    async with trio.open_nursery() as nursery:
        task_status.started(port)
        try:
            await trio.serve_listeners(one, listeners, handler_nursery=nursery)
        finally:
            for ln in listeners:
                with trio.CancelScope(shield=True):
                    await ln.aclose()


# ------------------------------------------------------------------ lending node
class Lender:
    """Which origin peer holds this node's RPC server (one at a time, see the note)."""

    def __init__(self) -> None:
        self.holder = ""
        self.streams = 0
        self._last_end = float("-inf")
        self._changed = trio.Event()

    def holder_now(self) -> str:
        """The holder, or "" once it has had no stream for HOLD_AFTER seconds."""
        if self.holder and self.streams == 0 and trio.current_time() - self._last_end > HOLD_AFTER:
            self.holder = ""
        return self.holder

    async def acquire(self, peer: str) -> bool:
        """Take the server for `peer`; False if another peer kept it for BUSY_WAIT."""
        with trio.move_on_after(BUSY_WAIT):
            while self.holder_now() not in ("", peer):
                wait = HOLD_AFTER - (trio.current_time() - self._last_end) if self.streams == 0 else BUSY_WAIT
                with trio.move_on_after(max(0.01, wait)):
                    await self._changed.wait()
            self.holder = peer
            self.streams += 1
            return True
        return False

    def release(self) -> None:
        self.streams -= 1
        if self.streams == 0:
            self._last_end = trio.current_time()
            self._changed.set()
            self._changed = trio.Event()


def make_handler(server) -> Callable[[object, str], Awaitable[None]]:
    """The `/mesh/rpc/1` handler: pipe each stream to the local RPC server.

    `server` is node/rpc_server.py's RpcServer (`endpoint()`, `lender`), or None when this
    node lends nothing."""

    async def handler(stream, peer: str) -> None:
        ep = server.endpoint() if server is not None else None
        if ep is None:
            log.info("RPC tunnel from %s refused: this node lends no memory now", peer[-8:])
            await stream.reset()
            return
        lender: Lender = server.lender
        if not await lender.acquire(peer):
            log.warning("RPC tunnel from %s refused: the RPC server is held by %s",
                        peer[-8:], lender.holder[-8:])
            await stream.reset()
            return
        tcp = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(*ep)
            _nodelay(tcp)
            async with trio.open_nursery() as nursery:
                client_done = False

                def client_left() -> None:
                    nonlocal client_done
                    client_done = True
                nursery.start_soon(_stream_to_tcp, stream, tcp, lambda n: None, client_left)
                await _batched_to_stream(tcp, stream, lambda n: None, lambda: None,
                                         replies=True)
                if not client_done:
                    # the server closed first (it died): abort the client at once
                    nursery.cancel_scope.cancel()
                    await stream.reset()
        except* (OSError, trio.TooSlowError) as group:
            log.warning("RPC tunnel from %s: local RPC server unreachable: %s", peer[-8:],
                        group.exceptions[0])
            await stream.reset()
        except* _Broken as group:
            log.info("RPC tunnel from %s: %s", peer[-8:], group.exceptions[0])
            await stream.reset()
        except* PeerError as group:
            log.debug("RPC tunnel from %s: %s", peer[-8:], group.exceptions[0])
            await stream.reset()
        finally:
            lender.release()
            if tcp is not None:
                with trio.CancelScope(shield=True):
                    await tcp.aclose()

    return handler
