"""Length-prefixed msgpack frames between the node and its worker processes.

A frame is a 4-byte big-endian length followed by one msgpack map. The same format is
spoken by the parent (trio, `read_frame`/`write_frame` on a trio stream) and the child
(blocking sockets, `SyncFramer`). Frames over MAX_FRAME are refused on both sides.

Parent -> worker: {"op": "generate"|"embed"|"transcribe"|"cancel"|"stats"|"health"|"unload",
                   "id": int, ...op fields}
Worker -> parent: {"id": int, "type": "delta"|"done"|"result"|"error", ...}
                  plus {"type": "ready", "info": {...}} and {"type": "fatal", "error": str}
                  with no id, once, after the model is loaded (or failed to load).
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import msgpack

MAX_FRAME = 64 * 1024 * 1024  # audio uploads travel in one frame; the API caps bodies below this
_HDR = struct.Struct(">I")


class FrameError(Exception):
    pass


def pack(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HDR.pack(len(body)) + body


def unpack(body: bytes) -> dict[str, Any]:
    obj = msgpack.unpackb(body, raw=False)
    if not isinstance(obj, dict):
        raise FrameError("frame is not a map")
    return obj


async def read_frame(stream) -> dict[str, Any] | None:
    """Read one frame from a trio stream; None on a clean EOF between frames."""
    hdr = await _read_exact(stream, _HDR.size, eof_ok=True)
    if hdr is None:
        return None
    (n,) = _HDR.unpack(hdr)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    body = await _read_exact(stream, n, eof_ok=False)
    return unpack(body)


async def _read_exact(stream, n: int, *, eof_ok: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            if eof_ok and not buf:
                return None
            raise FrameError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


class SyncFramer:
    """Blocking frame I/O for the worker side; writes are serialised by a lock so that
    several backend threads can emit frames at once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._wlock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        data = pack(obj)
        with self._wlock:
            self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        hdr = self._recv_exact(_HDR.size, eof_ok=True)
        if hdr is None:
            return None
        (n,) = _HDR.unpack(hdr)
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
        return unpack(self._recv_exact(n, eof_ok=False))

    def _recv_exact(self, n: int, *, eof_ok: bool) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                if eof_ok and not buf:
                    return None
                raise FrameError("connection closed mid-frame")
            buf += chunk
        return bytes(buf)
