"""mesh/wire/framing.py: the sans-I/O decoder and its adapters, on plain bytes and sockets."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from mesh.wire.framing import (MAX_FRAME, FrameDecoder, FrameError, FrameReader, SyncFramer,
                               pack, read_frame)


def test_decoder_splits_and_joins_frames_at_any_byte_boundary() -> None:
    frames = [{"a": 1}, {"b": b"\x00" * 70000}, {"c": "é"}]
    wire = b"".join(pack(f) for f in frames)
    for step in (1, 3, 4096, len(wire)):
        dec, out = FrameDecoder(), []
        for i in range(0, len(wire), step):
            dec.feed(wire[i:i + step])
            while (f := dec.next_frame()) is not None:
                out.append(f)
        dec.eof()
        assert out == frames


def test_decoder_refuses_oversized_truncated_and_non_map_frames() -> None:
    dec = FrameDecoder(max_frame=10)
    dec.feed(pack({"x": "y" * 20}))
    with pytest.raises(FrameError, match="exceeds"):
        dec.next_frame()
    dec = FrameDecoder()
    dec.feed(pack({"x": 1})[:-1])
    assert dec.next_frame() is None
    with pytest.raises(FrameError, match="mid-frame"):
        dec.eof()
    dec = FrameDecoder()
    dec.feed(b"\x00\x00\x00\x01\x05")            # msgpack 5: not a map
    with pytest.raises(FrameError, match="not a map"):
        dec.next_frame()
    with pytest.raises(FrameError):
        pack({"x": b"\x00" * (MAX_FRAME + 1)})


def test_trio_adapters_keep_bytes_after_a_frame() -> None:
    async def main():
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(pack({"n": 1}) + pack({"n": 2}) + b"raw tail")
        await a.aclose()
        assert await read_frame(b) == {"n": 1}        # reads exactly one frame
        reader = FrameReader(b)
        assert await reader.read() == {"n": 2}
        assert await reader.read_raw(100) == b"raw tail"
        assert await reader.read() is None           # clean EOF between frames
    trio.run(main)


def test_blocking_adapter() -> None:
    left, right = socket.socketpair()
    with left, right:
        SyncFramer(left).send({"op": "run", "id": 7})
        left.shutdown(socket.SHUT_WR)
        framer = SyncFramer(right)
        assert framer.recv() == {"op": "run", "id": 7}
        assert framer.recv() is None
