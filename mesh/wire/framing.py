"""Length-prefixed msgpack frames: the one codec of every stream protocol of the mesh.

A frame is a 4-byte big-endian length followed by one msgpack map. Workers (Unix socket),
the proxy (`/mesh/openai/2`), peer file transfers (`/mesh/files/1`) and the tests all
speak it through the same three pieces, in hypercorn's `protocol/` manner:

    FrameDecoder   sans-I/O: ``feed(bytes)`` then ``next_frame()`` until it returns None;
                   it never reads or waits, so it is tested with plain byte strings.
    read_frame     trio adapter: any object with ``receive_some(n)`` (a trio stream), or
                   ``read(n)`` (a mesh Stream, mesh/p2p/node.py).
    SyncFramer     blocking adapter for the worker processes (a socket and a write lock,
                   so several backend threads can emit frames at once).

Frames over MAX_FRAME are refused on both sides. ``read_frame`` returns None on a clean
EOF between frames and raises FrameError for EOF inside a frame or a malformed body.
Bytes a reader takes past the end of a frame are kept in its decoder for the next call:
callers that read frames and then raw bytes (peer file transfers) use one `FrameReader`.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import msgpack

__all__ = ["MAX_FRAME", "FrameError", "FrameDecoder", "FrameReader", "SyncFramer", "pack",
           "unpack", "read_frame"]

MAX_FRAME = 64 * 1024 * 1024  # audio uploads travel in one frame; the API caps bodies below this
_HDR = struct.Struct(">I")
_READ = 1 << 16


class FrameError(Exception):
    """A frame that is too big, cut short or not a msgpack map."""


def pack(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HDR.pack(len(body)) + body


def unpack(body: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises a zoo of ValueError subclasses
        raise FrameError(f"frame is not msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise FrameError("frame is not a map")
    return obj


class FrameDecoder:
    """Bytes in, frames out; no I/O."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take(self, n: int | None = None) -> bytes:
        """Raw bytes already received past the last frame (up to n)."""
        n = len(self._buf) if n is None else min(n, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def needed(self) -> int:
        """How many more bytes complete the next frame (at least 1 while unknown)."""
        if len(self._buf) < _HDR.size:
            return _HDR.size - len(self._buf)
        (n,) = _HDR.unpack_from(self._buf)
        return max(1, _HDR.size + n - len(self._buf))

    def next_frame(self) -> dict[str, Any] | None:
        if len(self._buf) < _HDR.size:
            return None
        (n,) = _HDR.unpack_from(self._buf)
        if n > self.max_frame:
            raise FrameError(f"frame of {n} bytes exceeds {self.max_frame}")
        end = _HDR.size + n
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[_HDR.size:end])
        del self._buf[:end]
        return unpack(body)

    def eof(self) -> None:
        """The peer closed the stream: fine between frames, an error inside one."""
        if self._buf:
            raise FrameError("connection closed mid-frame")


async def _receive(stream: Any, n: int) -> bytes:
    if hasattr(stream, "receive_some"):
        return await stream.receive_some(n)
    return await stream.read(n)


class FrameReader:
    """Frames from a trio stream or mesh Stream, keeping bytes read past a frame."""

    def __init__(self, stream: Any, max_frame: int = MAX_FRAME) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(max_frame)

    async def read(self) -> dict[str, Any] | None:
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = await _receive(self.stream, max(_READ, self.decoder.needed()))
            if not data:
                self.decoder.eof()
                return None
            self.decoder.feed(data)

    async def read_raw(self, n: int) -> bytes:
        """Up to n raw bytes (buffered ones first); b"" at EOF."""
        if self.decoder.buffered:
            return self.decoder.take(n)
        return await _receive(self.stream, n)


async def read_frame(stream: Any) -> dict[str, Any] | None:
    """Read exactly one frame (never past it) from a trio stream or a mesh Stream."""
    dec = FrameDecoder()
    while True:
        data = await _receive(stream, dec.needed())
        if not data:
            dec.eof()
            return None
        dec.feed(data)
        frame = dec.next_frame()
        if frame is not None:
            return frame


class SyncFramer:
    """Blocking frame I/O for the worker side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._wlock = threading.Lock()
        self._dec = FrameDecoder()

    def send(self, obj: dict[str, Any]) -> None:
        data = pack(obj)
        with self._wlock:
            self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        while True:
            frame = self._dec.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(max(1 << 20, self._dec.needed()))
            if not data:
                self._dec.eof()
                return None
            self._dec.feed(data)
