"""A bidirectional byte stream to one peer over one protocol (py-libp2p's, made safe).

``read`` returns b"" at EOF (py-libp2p raises StreamEOF); every other failure becomes
``PeerError``; ``close()`` half-closes (the peer reads EOF; we can still read its answer)
and releases the stream in py-libp2p's accounting; ``reset()`` aborts. ``async with``
resets on error and closes otherwise.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamEOF

from mesh.errors import PeerError
from mesh.p2p.host import _reason

__all__ = ["Stream"]

log = logging.getLogger(__name__)


class Stream:
    """A bidirectional byte stream to one peer over one protocol.

    Always end it with ``close()`` or ``reset()`` (or use ``async with``): that is what
    releases it in py-libp2p's accounting (10,000 streams per host).
    """

    def __init__(self, net_stream: Any, peer_id: str, protocol: str) -> None:
        self._s = net_stream
        self.peer_id = peer_id
        self.protocol = protocol
        self._eof = False
        self._closed = False
        self._reset = False

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; b"" once the peer has closed its side."""
        if self._eof:
            return b""
        try:
            data = await self._s.read(max_bytes)
        except StreamEOF:
            data = b""
        except Exception as exc:
            raise PeerError(f"stream from {self.peer_id[-8:]} broke: {_reason(exc)}") from exc
        if not data:
            self._eof = True
        return data

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; PeerError if the stream ends first."""
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.read(n - len(buf))
            if not chunk:
                raise PeerError(f"stream from {self.peer_id[-8:]} ended after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    async def write(self, data: bytes) -> None:
        try:
            await self._s.write(data)
        except Exception as exc:
            raise PeerError(f"stream to {self.peer_id[-8:]} broke: {_reason(exc)}") from exc

    async def close(self) -> None:
        """Half-close and release: the peer reads EOF; what it still sends can be read."""
        if self._closed or self._reset:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                await self._s.close()  # py-libp2p: FIN on the write side + release; reads go on
            except Exception as exc:
                log.debug("closing a stream to %s: %r", self.peer_id, exc)

    aclose = close

    async def reset(self) -> None:
        """Abort both directions at once."""
        if self._reset:
            return
        self._reset = True
        with trio.CancelScope(shield=True):
            try:
                await self._s.reset()
            except Exception:
                pass

    @property
    def ended(self) -> bool:
        """Closed or reset by us."""
        return self._closed or self._reset

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.reset()
