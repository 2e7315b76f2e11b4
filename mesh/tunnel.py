"""`/mesh/rpc/2`: llama.cpp RPC traffic carried between mesh peers.

llama.cpp's RPC server has no authentication, so it listens on 127.0.0.1 only
(node/rpc_server.py) and peers reach it through this protocol, negotiated on admitted,
Noise + PSK libp2p connections:

    loading node                                             lending node
    worker --TCP--> 127.0.0.1:L ==side channel (records)==> handler --TCP--> 127.0.0.1:RPC
                    (serve_tunnel, one per peer)            (make_handler)

Per accepted local connection (llama.cpp keeps one per server):

    client -> server  {"v": 2, "bulk": <client hello> | null, "fill": <sha256> | null}
    server -> client  {"ok": true, "bulk": <offer> | null, "fill": <bool>} | {"ok": false, "error"}
    client -> server  {"via": "bulk" | "stream"}
    then records both ways: on the side channel (mesh/bulk.py: direct TCP, AES-GCM) when
    the lender offers one and it can be reached, else on the libp2p stream itself
    (4-byte length + record; the stream is already encrypted).

A record is a list of segments, `type (1) | length (4) | body`:
    RAW   RPC bytes, as llama.cpp wrote them
    FILL  a SET_TENSOR whose data the lender reads from its own copy of the model file:
          prefix length (4) | the message up to its data | file offset (8) | data length (8)

Design notes
- Why a side channel: a py-libp2p round trip costs ~1.6-2.5 ms of Python here and
  llama.cpp waits for one per peer per token; weights crossed py-libp2p at ~30-40 MB/s.
  The side channel costs one AES-GCM call and a TCP write per message.
- Weights from the lender's own copy. llama.cpp's own mechanism (RPC_CMD_SET_TENSOR_HASH:
  the client sends the FNV-1a hash of a tensor's data, the server looks for
  `<cache dir>/<hash>`, written when it last received that tensor with `cache_flag`)
  applies only to tensors over HASH_THRESHOLD (10 MiB) in weight buffers: for
  Qwen2.5-Coder-1.5B Q4_K_M that is 20% of the layer bytes (the Q6_K ffn_down tensors),
  the rest would still cross the link. So the tunnel does it for every tensor: when the
  lender gossips the model file's sha256, the loading side collects each SET_TENSOR whole,
  finds the tensor by name (rpc_tensor.name) in the GGUF header, compares the data with
  its own file byte for byte, and sends a FILL instead; the lender writes the message to
  its RPC server with the bytes read from its file (same sha256, same bytes). A tensor
  whose data differs (or is not in the file, or is smaller than FILL_MIN) goes as it is.
  The lender's RPC server still caches big tensors as llama.cpp does (its `-c` dir).
- Batching (`Requests`, `RpcBatcher`): llama.cpp sends each peer several fire-and-forget
  commands (SET_TENSOR inputs, GRAPH_RECOMPUTE) and then one it waits on (GET_TENSOR);
  the loading side holds them until that one is whole and sends them in one record;
  the lending side sends a reply only once whole (llama.cpp writes size and payload
  separately). Anything held gets HOLD_MAX; an unknown command turns holding off.
- Half-close: EOF on one side is passed on as EOF, so the RPC server sees its client
  leave and frees its buffers. A channel that breaks, or a server that closes while the
  client still talks, aborts both sides at once; on the loading node `on_broken(reason)`
  is called *before* the local socket is closed (llama.cpp's RPC client aborts its
  process on a dead connection, so the node fails the model's requests first).
- One client at a time: the RPC server serves one connection and queues the rest. The
  handler gives the server to one origin peer at a time (`Lender`, gossiped as
  `rpc.used_by`); the holder keeps it for HOLD_AFTER seconds after its last stream, since
  llama.cpp opens a few short connections in a row while it loads. A stream from another
  peer waits up to BUSY_WAIT for it and is then refused.
- Relay threads (`_Ends`, `_relay`): once a connection is set up, its bytes move in two
  threads with blocking sockets (one per direction), not in trio tasks. Traced per
  message on this 2-core machine, a hop through a trio task (its wake-up from epoll, the
  checkpoints in send_all and receive_some, the node's other tasks ahead of it in the run
  queue) took 100-150 us; a thread blocked in recv wakes straight from the kernel:
  55-110 us, about half the ~1.8 ms the relays added per token with 2 lenders. Over the
  libp2p stream a task carries a socketpair's bytes to and from the stream (`join`), so
  the threads always see sockets. An abort is a `shutdown`; on the loading node it shuts
  llama.cpp's socket for reading only (which sends nothing), and the socket is closed
  after `on_broken`, keeping the order above.
- `probe` measures the link to a lender (side-channel round trip and throughput) for
  placement (node/placement.py); it needs no RPC server.
Left out on purpose: carrying a tensor between two lenders directly (llama.cpp's client
copies every activation through the loading node), and compressing records (hidden
states are fp32 noise to a compressor).
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import trio

from mesh import bulk
from mesh.errors import MeshError, PeerError
from mesh.localconn import owner_pid
from mesh.wire.framing import FrameError, pack, read_frame

__all__ = ["PROTOCOL", "BUFFER", "TunnelStats", "ModelFile", "LinkProbe", "serve_tunnel",
           "make_handler", "probe", "Lender", "RpcBatcher", "Requests", "match_fill"]

log = logging.getLogger("mesh.tunnel")

PROTOCOL = "/mesh/rpc/2"
PURPOSE = "rpc"
BUFFER = 1 << 20            # bytes per read: a weight upload moves in MiB-sized records
BUSY_WAIT = 3.0             # s a second origin waits for the RPC server before a refusal
HOLD_AFTER = 5.0            # s the holder keeps the server after its last stream
CONNECT_TIMEOUT = 5.0       # s to reach the local RPC server
OPEN_TIMEOUT = 10.0         # s: stream, request, reply, side channel
PROBE_BYTES = 8 << 20       # bytes a probe times
RAW, FILL, DEF, USE, SAME, DELTA = range(6)
SMALL = 64 << 10            # messages up to this size go through the Compressor
MAX_HEAD = 1024             # longest message head the Compressor names by id
MAX_HEADS = 4096            # heads per connection
MAX_DELTA = 64 << 10        # data kept per head for DELTA
_SEG = struct.Struct(">BI")
_U32 = struct.Struct(">I")
_FILL = struct.Struct(">QQ")

# llama.cpp RPC protocol 7 (ggml-rpc.cpp in llama-cpp-python 0.3.36): a request is
# cmd (1 byte) | size (8 bytes, little-endian) | payload. The commands the server answers;
# every other known one (SET_TENSOR, GRAPH_COMPUTE, GRAPH_RECOMPUTE, FREE_BUFFER,
# BUFFER_CLEAR, INIT_TENSOR, MEMSET_TENSOR) gets no answer, so the client never waits
# right after one of those.
RPC_ANSWERED = frozenset({0, 1, 2, 3, 7, 8, 9, 11, 13, 14, 15})
RPC_COMMANDS = 18            # RPC_CMD_COUNT - 1 (RPC_CMD_NONE never goes on the wire)
SET_TENSOR = 6
TENSOR_BYTES = 296           # sizeof(rpc_tensor): packed, GGML_MAX_SRC 10, GGML_MAX_NAME 64
NAME_AT, NAME_LEN = 228, 64  # rpc_tensor.name
SET_HEADER = 9 + TENSOR_BYTES + 1 + 8   # cmd, size | rpc_tensor | cache_flag | offset
FILL_MIN = 512               # data bytes below which a tensor is not worth a FILL (~330 B)
FILL_MAX = 256 << 20         # SET_TENSOR messages above this stream through unchanged
HOLD_MAX = 0.002             # s a fire-and-forget command may wait for company


@dataclass
class TunnelStats:
    """Bytes through one tunnel (the loading node's side). `sent`/`received` are what
    crossed the link (records, framing included); `filled` the tensor bytes the lender
    read from its own copy instead; `refused` the local connections turned away because
    no allowed process held them (mesh/localconn.py)."""
    sent: int = 0
    received: int = 0
    filled: int = 0
    streams: int = 0
    open: int = 0
    via: str = ""
    refused: int = 0
    port: int = 0               # the local end (127.0.0.1)


@dataclass(frozen=True)
class ModelFile:
    """The model file of a split, as the loading side knows it: its sha256, where it is,
    and each tensor's data (absolute offset, bytes) from the GGUF header."""
    sha256: str
    path: str
    tensors: Mapping[str, tuple[int, int]]


def _our_children() -> list[int]:
    try:
        return [p.pid for p in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return []


class _Broken(Exception):
    pass


def _nodelay(tcp: trio.SocketStream) -> None:
    try:
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _read_ready(sock: socket.socket, data: bytes) -> tuple[bytes, bool]:
    """`data` plus whatever else the socket already holds, without waiting; (bytes, eof).

    llama.cpp sends a message in several send() calls (command byte, size, payload; a
    reply's size, then payload), so the read that wakes us often holds only the first
    piece while the rest is already behind it."""
    parts = [data]
    size = len(data)
    while size < BUFFER:
        try:
            more = sock.recv(BUFFER - size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        except OSError as exc:
            raise _Broken(f"local socket: {exc}") from exc
        if not more:
            return b"".join(parts), True
        parts.append(more)
        size += len(more)
    return (b"".join(parts) if len(parts) > 1 else data), False


# ------------------------------------------------------------------ batching (no I/O)
class RpcBatcher:
    """Holds RPC bytes until the far side can act on them (see the module note).

    Requests (`replies=False`): held until a command the server answers is whole.
    Replies (`replies=True`: size (8 bytes) | payload): held until the reply is whole.
    A command number this protocol does not have turns holding off for the connection;
    a caller flushes what is held after HOLD_MAX without new bytes, and at EOF."""

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


class Requests:
    """The loading side's request batcher: RpcBatcher's rule, message by message.

    `feed(data)` returns the items to send now, in order, or None to keep holding:
    (MSG, message) a whole message of at most SMALL bytes (the codec's), (SET, message) a
    whole SET_TENSOR carrying at least FILL_MIN bytes when `collect` is on (a FILL
    candidate), (RAW, bytes) pieces of a bigger message, flushed every BUFFER bytes."""
    SET, MSG = -1, -2

    def __init__(self, *, collect: bool) -> None:
        self.collect = collect
        self.enabled = True
        self._out: list[tuple[int, bytes]] = []
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._header = b""
        self._cmd = -1
        self._remaining = 0
        self._msg: bytearray | None = None
        self._pos = 0
        self._kind = RAW
        self._flush = False

    @property
    def holding(self) -> bool:
        return bool(self._out or self._raw)

    def take(self, *, final: bool = False) -> list[tuple[int, bytes]]:
        """Everything whole so far; with `final` (EOF) whatever is left too."""
        if final:
            if self._msg is not None:
                self._add(bytes(self._msg[:self._pos]))
                self._msg = None
            self._add(self._header)
            self._header = b""
        self._cut()
        out, self._out = self._out, []
        return out

    def _cut(self) -> None:
        if self._raw:
            self._out.append((RAW, b"".join(self._raw)))
            self._raw, self._raw_size = [], 0

    def _add(self, data: bytes) -> None:
        if data:
            self._raw.append(data)
            self._raw_size += len(data)

    def feed(self, data: bytes) -> list[tuple[int, bytes]] | None:
        if not self.enabled:
            self._add(data)
            return self.take()
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                step = min(self._remaining, n - i)
                if self._msg is not None:
                    self._msg[self._pos:self._pos + step] = memoryview(data)[i:i + step]
                    self._pos += step
                else:
                    self._add(data[i:i + step])
                i += step
                self._remaining -= step
                if self._remaining == 0:
                    self._end()
                continue
            need = 9 - len(self._header)
            self._header += data[i:i + need]
            i += min(need, n - i)
            if len(self._header) < 9:
                break
            header, self._header = self._header, b""
            cmd, size = header[0], int.from_bytes(header[1:], "little")
            if cmd >= RPC_COMMANDS:            # not protocol 7: pass everything through
                self.enabled = False
                self._cut()
                self._add(header + data[i:])
                return self.take()
            self._cmd, self._remaining = cmd, size
            if self.collect and cmd == SET_TENSOR and SET_HEADER - 9 + FILL_MIN <= size <= FILL_MAX:
                self._kind = self.SET
            elif 9 + size <= SMALL:
                self._kind = self.MSG
            else:
                self._kind = RAW
            if self._kind == RAW:
                self._add(header)
            else:
                self._cut()                    # what came before goes first
                self._msg = bytearray(9 + size)
                self._msg[:9] = header
                self._pos = 9
            if size == 0:
                self._end()
        if self._flush or self._raw_size >= BUFFER:
            self._flush = False
            return self.take()
        return None

    def into(self) -> memoryview | None:
        """Where the rest of a message being collected goes, for a `recv_into` (then
        `received(n)`): a big upload lands in its buffer with no copy on the way."""
        return memoryview(self._msg)[self._pos:] if self._msg is not None and self.enabled else None

    def received(self, n: int) -> list[tuple[int, bytes]] | None:
        """`n` bytes were written into `into()`; like `feed`."""
        self._pos += n
        self._remaining -= n
        if self._remaining == 0:
            self._end()
        if self._flush:
            self._flush = False
            return self.take()
        return None

    def _end(self) -> None:
        if self._msg is not None:
            self._out.append((self._kind, self._msg))
            self._msg = None
        if self._cmd in RPC_ANSWERED:
            self._flush = True


class Compressor:
    """Small RPC messages in few bytes (loading side; `Expander` undoes it on the lender).

    Per token llama.cpp sends each peer the same handful of messages: SET_TENSORs whose
    296-byte rpc_tensor head is the same every time (only the data changes), the same
    GRAPH_RECOMPUTE and GET_TENSOR, the hidden state twice (two input tensors with the
    same data), and KQ masks that change in a few cells per token. So a message's head
    (up to its data; a whole message that has none) is sent once (DEF) and then named by
    id (USE); data equal to an earlier message's in the same batch is named by index
    (SAME); data of the same size as this head's previous data is sent as the zlib of
    their XOR when that is less than half the size (DELTA)."""

    def __init__(self) -> None:
        self._ids: dict[bytes, int] = {}
        self._last: dict[int, bytes] = {}

    def encode(self, msg: bytes, batch: list[bytes]) -> list[tuple[int, bytes]]:
        """Segments for one whole message; `batch` collects this batch's data (for SAME)."""
        head = bytes(msg[:SET_HEADER] if msg[0] == SET_TENSOR and len(msg) >= SET_HEADER else msg)
        if len(head) > MAX_HEAD:
            return [(RAW, msg)]
        data = bytes(msg[len(head):])
        out: list[tuple[int, bytes]] = []
        hid = self._ids.get(head)
        if hid is None:
            if len(self._ids) >= MAX_HEADS:
                return [(RAW, msg)]
            hid = self._ids[head] = len(self._ids)
            out.append((DEF, _U32.pack(hid) + head))
        ref = _U32.pack(hid)
        prev = self._last.get(hid)
        if data and data in batch:
            out.append((SAME, ref + bytes([batch.index(data)])))
        elif data and prev is not None and len(prev) == len(data):
            z = zlib.compress(_xor(prev, data), 1)
            out.append((DELTA, ref + z) if len(z) < len(data) // 2 else (USE, ref + data))
        else:
            out.append((USE, ref + data))
        if data:
            if len(batch) < 255:
                batch.append(data)
            if len(data) <= MAX_DELTA:
                self._last[hid] = data
        return out


class Expander:
    """The lender's side of `Compressor`: segments back into RPC messages."""

    def __init__(self) -> None:
        self._heads: dict[int, bytes] = {}
        self._last: dict[int, bytes] = {}

    def decode(self, t: int, body: memoryview, batch: list[bytes]) -> bytes | None:
        """The message a segment stands for (None for a DEF)."""
        if len(body) < 4:
            raise bulk.ChannelBroken("truncated tunnel segment")
        (hid,) = _U32.unpack_from(body, 0)
        rest = bytes(body[4:])
        if t == DEF:
            if len(rest) > MAX_HEAD or (hid not in self._heads and len(self._heads) >= MAX_HEADS):
                raise bulk.ChannelBroken("tunnel head over the limits")
            self._heads[hid] = rest
            return None
        head = self._heads.get(hid)
        if head is None:
            raise bulk.ChannelBroken(f"tunnel head {hid} was never defined")
        if t == USE:
            data = rest
        elif t == SAME:
            if len(rest) != 1 or rest[0] >= len(batch):
                raise bulk.ChannelBroken("bad SAME segment")
            data = batch[rest[0]]
        else:                                   # DELTA
            prev = self._last.get(hid)
            try:
                x = zlib.decompressobj().decompress(rest, MAX_DELTA + 1)
            except zlib.error:
                raise bulk.ChannelBroken("bad DELTA segment") from None
            if prev is None or len(x) != len(prev):
                raise bulk.ChannelBroken("bad DELTA segment")
            data = _xor(prev, x)
        if data:
            if len(batch) < 255:
                batch.append(data)
            if len(data) <= MAX_DELTA:
                self._last[hid] = data
        return head + data


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def match_fill(msg: bytes, model: ModelFile, mm) -> bytes | None:
    """The FILL body for a whole SET_TENSOR message whose data is bytes of `model`'s file
    (`mm`, mapped), else None (blocking: compares up to the tensor's size)."""
    n = len(msg) - SET_HEADER
    if n < FILL_MIN:
        return None
    found = model.tensors.get(_tensor_name(msg))
    if found is None:
        return None
    (offset,) = struct.unpack_from("<Q", msg, SET_HEADER - 8)
    start, nbytes = found
    if offset + n > nbytes or start + offset + n > len(mm):
        return None
    at = start + offset
    if not np.array_equal(np.frombuffer(mm, np.uint8, n, at),      # no copies
                          np.frombuffer(msg, np.uint8, n, SET_HEADER)):
        return None
    return _U32.pack(SET_HEADER) + msg[:SET_HEADER] + _FILL.pack(at, n)


def _tensor_name(msg: bytes) -> str:
    """rpc_tensor.name of a SET_TENSOR message."""
    return msg[9 + NAME_AT:9 + NAME_AT + NAME_LEN].split(b"\0", 1)[0].decode("utf-8", "replace")


def _encode(segments: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_SEG.pack(t, len(b)) + b for t, b in segments)


def _decode(record: bytes) -> list[tuple[int, memoryview]]:
    view, out, i = memoryview(record), [], 0
    while i < len(view):
        if len(view) - i < _SEG.size:
            raise bulk.ChannelBroken("truncated tunnel segment")
        t, n = _SEG.unpack_from(view, i)
        i += _SEG.size
        if t > DELTA or i + n > len(view):
            raise bulk.ChannelBroken("malformed tunnel segment")
        out.append((t, view[i:i + n]))
        i += n
    return out


# ------------------------------------------------------------------ channels
class _Frames:
    """Tunnel messages (4-byte length + body) cut out of a byte pipe's chunks, which may
    cut a message anywhere (no I/O)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def push(self, data) -> None:
        self._buf += data

    def pop(self) -> bytes | None:
        """The next whole message, or None until more bytes come."""
        if len(self._buf) < 4:
            return None
        (n,) = _U32.unpack_from(self._buf, 0)
        if n > FILL_MAX + (1 << 20):
            raise bulk.ChannelBroken(f"tunnel message of {n} bytes")
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        return body

    @property
    def partial(self) -> bool:
        return bool(self._buf)


def _channel_overhead(n: int) -> int:
    return max(1, -(-n // bulk.RECORD)) * (4 + bulk.TAG)


class _Messages:
    """Tunnel messages over a byte pipe while a connection is set up, and for probes: the
    side channel (`channel`, records) or the libp2p stream itself (`stream`). The relay
    threads take the connection over from it (`_Ends`)."""

    def __init__(self, write, read, eof, close, via: str, overhead: Callable[[int], int],
                 *, channel: bulk.TrioChannel | None = None, stream=None) -> None:
        self._write, self._read, self._eof, self._close = write, read, eof, close
        self.via = via
        self.overhead = overhead
        self.channel, self.stream = channel, stream
        self._frames = _Frames()

    @classmethod
    def over_stream(cls, stream) -> "_Messages":
        async def nothing() -> None:
            pass
        return cls(stream.write, stream.read, stream.close, nothing, "libp2p stream",
                   lambda n: 0, stream=stream)

    @classmethod
    def over_channel(cls, chan: bulk.TrioChannel) -> "_Messages":
        async def read(_n: int) -> bytes:
            return await chan.recv()
        return cls(chan.send, read, chan.send_eof, chan.aclose, "side channel",
                   _channel_overhead, channel=chan)

    async def send(self, data: bytes) -> int:
        """Send one message; the bytes that cross the link for it."""
        await self._write(_U32.pack(len(data)) + data)
        return _cost(len(data), self.overhead)

    async def recv(self) -> bytes:
        """One message; b"" at a clean EOF between messages."""
        while (msg := self._frames.pop()) is None:
            data = await self._read(1 << 16)
            if not data:
                if self._frames.partial:
                    raise bulk.ChannelBroken("the tunnel closed mid-message")
                return b""
            self._frames.push(data)
        return msg

    async def aclose(self) -> None:
        await self._close()


def _cost(n: int, overhead: Callable[[int], int]) -> int:
    """Bytes on the link for a message of n bytes (framing and record overhead)."""
    return 4 + n + overhead(4 + n)


class _Pipe:
    """The relay threads' message pipe to the far side: blocking, over the side channel's
    records (bulk.SyncChannel) or over a socketpair end that `_Ends.join` carries to the
    libp2p stream."""

    def __init__(self, sock: socket.socket, chan: bulk.SyncChannel | None,
                 overhead: Callable[[int], int]) -> None:
        self.sock, self._chan, self._overhead = sock, chan, overhead
        self._frames = _Frames()
        self._buf = bytearray(bulk.RECORD)

    def send(self, data: bytes) -> int:
        framed = _U32.pack(len(data)) + data
        if self._chan is not None:
            self._chan.send(framed)
        else:
            try:
                self.sock.sendall(framed)
            except OSError as exc:
                raise bulk.ChannelBroken(f"the libp2p stream's pipe: {exc}") from exc
        return _cost(len(data), self._overhead)

    def cost(self, n: int) -> int:
        return _cost(n, self._overhead)

    def recv(self) -> bytes:
        """One message; b"" at a clean EOF between messages."""
        view = memoryview(self._buf)
        while (msg := self._frames.pop()) is None:
            if self._chan is not None:
                n = self._chan.recv_into(view)
            else:
                try:
                    n = self.sock.recv_into(view)
                except OSError as exc:
                    raise bulk.ChannelBroken(f"the libp2p stream's pipe: {exc}") from exc
            if not n:
                if self._frames.partial:
                    raise bulk.ChannelBroken("the tunnel closed mid-message")
                return b""
            self._frames.push(view[:n])
        return msg

    def send_eof(self) -> None:
        _shut(self.sock, socket.SHUT_WR)


def _shut(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


class _Ends:
    """One tunnel connection as its two relay threads see it (see "Relay threads" in the
    module note): `local`, the socket to llama.cpp (or to the RPC server), and `pipe`, both
    blocking; the trio streams they came from are spent. `abort()` unblocks both threads;
    `close()`, once they have ended, is what the local side sees. With `quiet_local` (the
    loading node) an abort leaves llama.cpp's socket open until then, so the node can
    fail the model's requests with the reason first."""

    def __init__(self, tcp: trio.SocketStream, chan: _Messages, *, quiet_local: bool) -> None:
        self.aborted = False
        self._local_abort = socket.SHUT_RD if quiet_local else socket.SHUT_RDWR
        self.client_done = False        # the near side (llama.cpp, or the origin) sent EOF
        self._stream = chan.stream
        self._joined: trio.SocketStream | None = None
        if chan.channel is not None:
            sync = chan.channel.to_sync()
            self.pipe = _Pipe(sync.sock, sync, chan.overhead)
        else:
            ours, theirs = socket.socketpair()
            self._joined = bulk.to_trio(theirs)
            self.pipe = _Pipe(ours, None, chan.overhead)
        self.local = bulk.to_blocking(tcp)
        self._writable = select.poll()
        self._writable.register(self.local, select.POLLOUT)

    def client_left(self) -> None:
        self.client_done = True

    def quiet(self, fn: Callable[["_Ends"], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(self)
            except (OSError, _Broken, bulk.ChannelBroken):
                if not self.aborted:
                    raise
        return run

    def abort(self) -> None:
        self.aborted = True            # first: a thread woken by the shutdown sees it
        _shut(self.pipe.sock, socket.SHUT_RDWR)
        _shut(self.local, self._local_abort)     # SHUT_RD: wakes a read, sends nothing

    def send_local(self, data) -> None:
        """sendall to the local socket that an abort also ends (SHUT_RD does not wake a
        blocked send: this one waits in short polls)."""
        view = memoryview(data)
        while view:
            try:
                n = self.local.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if self.aborted:
                    raise _Broken("aborted") from None
                self._writable.poll(200)
                continue
            except OSError as exc:
                raise _Broken(f"local socket: {exc}") from exc
            view = view[n:]

    def close(self) -> None:
        self.local.close()
        self.pipe.sock.close()

    async def join(self) -> None:
        """Over the libp2p stream: carry the pipe's bytes to and from it until EOF both
        ways (a task beside the threads). A stream that breaks raises PeerError. Over the
        side channel there is nothing to do."""
        end, stream = self._joined, self._stream
        if end is None:
            return

        async def out() -> None:
            try:
                while data := await end.receive_some(1 << 16):
                    await stream.write(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return                   # the threads' end was aborted
            await stream.close()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out)
                try:
                    while data := await stream.read(1 << 16):
                        await end.send_all(data)
                    await end.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            await end.aclose()


async def _open_client(p2p, peer_id: str, request: dict, *, side_channel: bool):
    """(stream, records channel, reply) for a new tunnel connection; MeshError on failure."""
    stream = await p2p.open_stream(peer_id, PROTOCOL)
    try:
        nonce, hello = bulk.client_hello()
        await stream.write(pack({**request, "v": 2, "bulk": hello if side_channel else None}))
        reply = await read_frame(stream)
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            err = reply.get("error") if isinstance(reply, dict) else "no answer"
            raise PeerError(f"it refused the RPC tunnel: {err}")
        chan = None
        if side_channel and reply.get("bulk") is not None:
            peer = p2p.view.get(peer_id)
            try:
                conn, keys = await bulk.connect(bulk.ips_of(peer.state.addrs if peer else []),
                                                reply["bulk"], nonce, PURPOSE, p2p.peer_id, peer_id)
                chan = _Messages.over_channel(bulk.TrioChannel(conn, keys))
            except bulk.ChannelBroken as exc:
                log.info("RPC tunnel to %s: %s; using the libp2p stream", peer_id[-8:], exc.message)
        await stream.write(pack({"via": "bulk" if chan else "stream"}))
        return stream, chan or _Messages.over_stream(stream), reply
    except BaseException:
        await stream.reset()
        raise


# ------------------------------------------------------------------ relay threads
def _readable(sock: socket.socket) -> Callable[[float], bool]:
    """`wait(seconds)`: whether `sock` has bytes (or EOF) within that time."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return lambda seconds: bool(poller.poll(seconds * 1000))


def _read_local(local: socket.socket, readable: Callable[[float], bool],
                holding: bool) -> tuple[bytes | None, bool]:
    """(bytes, eof) from the local socket, with whatever else it already holds; (None,
    False) when something is held and nothing came within HOLD_MAX."""
    try:
        if holding and not readable(HOLD_MAX):
            return None, False
        data = local.recv(BUFFER)
    except OSError as exc:
        raise _Broken(f"local socket: {exc}") from exc
    if not data:
        return b"", True
    return _read_ready(local, data)


def _requests_out(stats: TunnelStats, model: ModelFile | None, mm, ends: _Ends) -> None:
    """llama.cpp's socket -> pipe, in whole RPC messages, SET_TENSORs as FILLs where they
    can (the loading node's first thread)."""
    local, pipe = ends.local, ends.pipe
    batch = Requests(collect=model is not None)
    codec = Compressor()
    readable = _readable(local)

    def send(items: list[tuple[int, bytes]]) -> None:
        if not items:
            return
        out: list[tuple[int, bytes]] = []
        seen: list[bytes] = []
        for t, body in items:
            if t == Requests.SET and _tensor_name(body) in model.tensors:  # a weight
                fill = match_fill(body, model, mm)
                if fill is not None:
                    stats.filled += len(body) - SET_HEADER
                    out.append((FILL, fill))
                    continue
            if t == Requests.SET:
                t = Requests.MSG if len(body) <= SMALL else RAW
            if t == Requests.MSG:
                out += codec.encode(body, seen)
            else:
                out.append((RAW, body))
        stats.sent += pipe.send(_encode(out))

    while True:
        view = batch.into()
        try:
            if view is not None:              # a weight upload: straight into its buffer
                n = local.recv_into(view)
                if n:
                    send(batch.received(n) or [])
                    continue
                data, eof = b"", True
            else:
                data, eof = _read_local(local, readable, batch.holding)
                if data is None:
                    send(batch.take())        # held long enough: send it
                    continue
        except OSError as exc:
            raise _Broken(f"local socket: {exc}") from exc
        if data:
            out = batch.feed(data)
            send(out if out is not None else (batch.take() if eof else []))
        if eof:
            send(batch.take(final=True))
            if not ends.aborted:
                ends.client_left()
            pipe.send_eof()                   # half-close: the far side reads EOF
            return


def _to_local(count: Callable[[int], None],
              fill: Callable[[memoryview, _Ends], None] | None, ends: _Ends) -> None:
    """Pipe -> the local socket until a clean EOF (then passed on). With `fill` (the
    lending side, whose near side is the pipe) requests come compressed and FILLs are read
    from the model file."""
    local, pipe = ends.local, ends.pipe
    codec = Expander()
    while True:
        record = pipe.recv()
        if not record:
            if fill is not None and not ends.aborted:
                ends.client_left()
            if fill is not None or ends.client_done:
                _shut(local, socket.SHUT_WR)
            # else the lender went away while llama.cpp still talks: its socket stays
            # open until on_broken has run (see "Half-close")
            return
        count(pipe.cost(len(record)))
        seen: list[bytes] = []
        out: list[bytes] = []              # written in one call: one wake-up of the server
        try:
            for t, body in _decode(record):
                if t == RAW:
                    out.append(body)
                elif fill is None:
                    raise bulk.ChannelBroken("a request segment in a reply")
                elif t == FILL:
                    if out:
                        ends.send_local(b"".join(out))
                        out = []
                    fill(body, ends)
                elif (msg := codec.decode(t, body, seen)) is not None:
                    out.append(msg)
            if out:
                ends.send_local(out[0] if len(out) == 1 else b"".join(out))
        except OSError as exc:
            raise _Broken(f"local socket: {exc}") from exc


def _replies_out(ends: _Ends) -> None:
    """The RPC server's socket -> pipe, one whole reply per record (the lender's thread)."""
    local, pipe = ends.local, ends.pipe
    batcher = RpcBatcher(replies=True)
    readable = _readable(local)
    while True:
        data, eof = _read_local(local, readable, batcher.holding)
        if data is None:
            pipe.send(_encode([(RAW, batcher.take())]))
            continue
        if data:
            out = batcher.feed(data)
            if out is None and eof:
                out = batcher.take()
            if out:
                pipe.send(_encode([(RAW, out)]))
        if eof:
            pipe.send_eof()
            return


def _filler(fh) -> Callable[[memoryview, _Ends], None]:
    """The lender's FILL: the message head, then the data from its own copy of the file
    (blocking: the lender's abort shuts the RPC server's socket down both ways)."""
    def fill(body: memoryview, ends: _Ends) -> None:
        if fh is None:
            raise bulk.ChannelBroken("a FILL on a tunnel without the model file")
        (plen,) = _U32.unpack_from(body, 0)
        prefix = body[4:4 + plen]
        if len(body) != 4 + plen + _FILL.size or plen < 9 or prefix[0] != SET_TENSOR:
            raise bulk.ChannelBroken("malformed FILL segment")
        at, n = _FILL.unpack_from(body, 4 + plen)
        if int.from_bytes(prefix[1:9], "little") != plen - 9 + n:
            raise bulk.ChannelBroken("FILL sizes do not add up")
        ends.send_local(prefix)
        while n:                              # page cache -> socket in the kernel
            try:
                sent = os.sendfile(ends.local.fileno(), fh.fileno(), at, n)
            except OSError as exc:
                raise _Broken(f"local socket: {exc}") from exc
            if sent == 0:
                raise _Broken("the model file is shorter than a FILL asks")
            at, n = at + sent, n - sent
    return fill


async def _relay(ends: _Ends, first: Callable[..., None], second: Callable[..., None],
                 on_died: Callable[[], None] = lambda: None) -> None:
    """Run the two directions, `first(ends)` (which calls `ends.client_left` at the near
    side's EOF) and `second(ends)`, each in its own thread, beside the join task, until
    both end. When `second` ends at a clean EOF while the near side still talks, the far
    side (the lender, or the RPC server) went away: `on_died()`, then the rest is aborted.
    A thread's error after an abort is the abort's doing and is not raised. The caller
    closes `ends` afterwards."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ends.join)
        nursery.start_soon(partial(bulk.run_blocking, ends.quiet(first), abort=ends.abort,
                                   own_thread=True))
        await bulk.run_blocking(ends.quiet(second), abort=ends.abort, own_thread=True)
        if not ends.aborted and not ends.client_done:
            on_died()
            ends.abort()
            nursery.cancel_scope.cancel()


async def serve_tunnel(p2p, peer_id: str, *, on_broken: Callable[[str], None],
                       stats: TunnelStats | None = None, model: ModelFile | None = None,
                       side_channel: bool = True, allowed: Callable[[], Iterable[int]] | None = None,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on 127.0.0.1 (a free port, passed to `task_status.started`) and carry every
    connection from one of the `allowed()` processes (by default this process's children:
    the node's workers) to `peer_id`'s RPC server; any other local process's connection is
    closed unread (mesh/localconn.py). With `model` (the peer gossips that file), weight
    uploads are FILLs. Never returns; cancel it to close the tunnel (connections are reset)."""
    allowed = allowed or _our_children
    stats = stats if stats is not None else TunnelStats()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stats.port = port
    name = peer_id[-8:]
    mm = None
    if model is not None:
        with open(model.path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    async def one(tcp: trio.SocketStream) -> None:
        if owner_pid(tcp.socket, allowed()) is None:
            stats.refused += 1
            log.warning("RPC tunnel to %s: refused a local connection from a process that is "
                        "not this node's worker", name)
            await tcp.aclose()
            return
        _nodelay(tcp)
        stats.streams += 1
        stats.open += 1
        stream = chan = ends = None
        try:
            try:
                with trio.fail_after(OPEN_TIMEOUT):
                    stream, chan, reply = await _open_client(
                        p2p, peer_id, {"fill": model.sha256 if model else None},
                        side_channel=side_channel)
            except (MeshError, FrameError, trio.TooSlowError) as exc:
                reason = getattr(exc, "message", None) or str(exc) or "no answer in time"
                on_broken(f"cannot open the RPC tunnel to peer {name}: {reason}")
                return
            stats.via = chan.via
            use = model if reply.get("fill") is True else None

            def received(n: int) -> None:
                stats.received += n

            def died() -> None:       # the server side ended while its client still talks
                on_broken(f"peer {name} closed the RPC connection (its RPC server "
                          "or node went away)")

            ends = _Ends(tcp, chan, quiet_local=True)
            await _relay(ends, partial(_requests_out, stats, use, mm),
                         partial(_to_local, received, None), died)
        except* PeerError as group:
            if ends is None or not ends.client_done:
                on_broken(f"the RPC tunnel to peer {name} broke: {group.exceptions[0].message}")
        except* _Broken:
            pass    # our side (the model's worker) went away: its supervisor knows
        except* Exception as group:     # a bug here must not take the node down
            log.error("RPC tunnel to %s failed", name, exc_info=group)
            if ends is None or not ends.client_done:
                on_broken(f"the RPC tunnel to peer {name} failed: {group.exceptions[0]!r}")
        finally:
            stats.open -= 1
            if ends is not None:
                ends.close()              # llama.cpp sees its connection end only now
            with trio.CancelScope(shield=True):
                if chan is not None:
                    await chan.aclose()
                if stream is not None and not stream.ended:
                    await stream.reset()
                await tcp.aclose()

    try:
        async with trio.open_nursery() as nursery:
            task_status.started(port)
            try:
                await trio.serve_listeners(one, listeners, handler_nursery=nursery)
            finally:
                for ln in listeners:
                    with trio.CancelScope(shield=True):
                        await ln.aclose()
    finally:
        if mm is not None:
            mm.close()


# ------------------------------------------------------------------ probing
@dataclass(frozen=True)
class LinkProbe:
    rtt_ms: float
    mbps: float
    via: str


async def probe(p2p, peer_id: str, *, nbytes: int = PROBE_BYTES,
                side_channel: bool = True) -> LinkProbe:
    """Round trip and throughput of the tunnel path to a lender (MeshError on failure)."""
    with trio.fail_after(OPEN_TIMEOUT):
        stream, chan, _ = await _open_client(p2p, peer_id, {"probe": True},
                                             side_channel=side_channel)
    try:
        with trio.fail_after(OPEN_TIMEOUT):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                await chan.send(b"p")
                if await chan.recv() != b"p":
                    raise PeerError("the probe echo came back wrong")
                best = min(best, time.perf_counter() - t0)
            t0 = time.perf_counter()
            await chan.send(struct.pack(">Q", nbytes))
            got = 0
            while got < nbytes:
                record = await chan.recv()
                if not record:
                    raise PeerError("the probe ended early")
                got += len(record)
            took = max(time.perf_counter() - t0 - best, 1e-6)
        return LinkProbe(rtt_ms=best * 1000, mbps=nbytes / took / 1e6, via=chan.via)
    except trio.TooSlowError:
        raise PeerError(f"peer {peer_id[-8:]} did not answer the link probe in time") from None
    finally:
        await chan.aclose()
        await stream.reset()


async def _answer_probe(chan) -> None:
    while True:
        record = await chan.recv()
        if not record:
            return
        if len(record) == 8:
            (n,) = struct.unpack(">Q", record)
            block = bytes(min(n, bulk.RECORD))
            while n > 0:
                await chan.send(block[:min(n, len(block))])
                n -= len(block)
        else:
            await chan.send(record[:1])


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


FindFile = Callable[[str], "Path | None"]


def make_handler(server, *, bulk_server: bulk.BulkServer | None = None,
                 find_file: FindFile = lambda sha: None) -> Callable[[object, str], Awaitable[None]]:
    """The `/mesh/rpc/2` handler: pipe each connection to the local RPC server.

    `server` is node/rpc_server.py's RpcServer (`endpoint()`, `connect()`, `lender`), or
    None when this node lends nothing; `find_file(sha256)` the path of an installed file (FILLs read it)."""

    async def refuse(stream, error: str) -> None:
        await stream.write(pack({"ok": False, "error": error}))

    async def handler(stream, peer: str) -> None:
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                req = await read_frame(stream)
        except (FrameError, PeerError, trio.TooSlowError, ValueError):
            await stream.reset()
            return
        if not isinstance(req, dict) or req.get("v") != 2:
            await stream.reset()
            return
        if req.get("probe") is True:
            await _serve(stream, peer, req, None, None, bulk_server)
            return
        ep = server.endpoint() if server is not None else None
        if ep is None:
            log.info("RPC tunnel from %s refused: this node lends no memory now", peer[-8:])
            await refuse(stream, "this node lends no memory now")
            return
        lender: Lender = server.lender
        if not await lender.acquire(peer):
            log.warning("RPC tunnel from %s refused: the RPC server is held by %s",
                        peer[-8:], lender.holder[-8:])
            await refuse(stream, "its RPC server is held by another node")
            return
        fh = None
        try:
            sha = req.get("fill")
            path = find_file(sha) if isinstance(sha, str) else None
            if path is not None:
                try:
                    fh = open(path, "rb")
                except OSError:
                    fh = None
            await _serve(stream, peer, req, server.connect, fh, bulk_server)
        finally:
            if fh is not None:
                fh.close()
            lender.release()

    return handler


async def _serve(stream, peer: str, req: dict, connect, fh, server: bulk.BulkServer | None) -> None:
    """Answer the request, set the channel up, then pipe to a connection `connect()` makes
    to the local RPC server (or answer a probe: `connect` None)."""
    offer = server.offer(peer, PURPOSE, req.get("bulk")) if server is not None else None
    await stream.write(pack({"ok": True, "bulk": offer.wire if offer else None,
                             "fill": fh is not None}))
    try:
        with trio.fail_after(OPEN_TIMEOUT):
            via = await read_frame(stream)
    except (FrameError, PeerError, trio.TooSlowError, ValueError):
        await stream.reset()
        return
    chan = None
    if offer is not None and isinstance(via, dict) and via.get("via") == "bulk":
        sock = await offer.accept(server)
        if sock is None:
            await stream.reset()
            return
        chan = _Messages.over_channel(bulk.TrioChannel(bulk.to_trio(sock), offer.keys))
    elif offer is not None:
        offer.withdraw(server)
    chan = chan or _Messages.over_stream(stream)
    try:
        if connect is None:
            await _answer_probe(chan)
        else:
            await _pipe(stream, peer, chan, connect, fh)
    except (PeerError, _Broken) as exc:
        log.info("RPC tunnel from %s: %s", peer[-8:], getattr(exc, "message", None) or exc)
        await stream.reset()
    finally:
        await chan.aclose()


async def _pipe(stream, peer: str, chan, connect, fh) -> None:
    tcp = None
    try:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                tcp = await connect()
        except (OSError, trio.TooSlowError) as exc:
            log.warning("RPC tunnel from %s: local RPC server unreachable: %s", peer[-8:], exc)
            await stream.reset()
            return
        _nodelay(tcp)
        ends = _Ends(tcp, chan, quiet_local=False)
        died = []
        try:
            await _relay(ends, partial(_to_local, lambda n: None, _filler(fh)), _replies_out,
                         lambda: died.append(True))
        finally:
            ends.close()
        if died:
            await stream.reset()      # the server closed first (it died): abort the client
    finally:
        if tcp is not None:
            with trio.CancelScope(shield=True):
                await tcp.aclose()
