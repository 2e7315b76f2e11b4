"""The bulk side channel (mesh/bulk.py) and the RPC tunnel's message codec (mesh/tunnel.py).

Records and keys without I/O; then a real listener on 127.0.0.1 with tickets (one use,
expiry, strangers); then the tunnel's sans-I/O parts: the request batcher, the
Compressor/Expander pair and FILL matching against a file.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
from pathlib import Path

import pytest
import trio

from mesh import bulk, tunnel
from mesh.bulk import ChannelBroken, Opener, Sealer, derive_keys

DEADLINE = 20.0


def run(fn):
    async def main():
        with trio.fail_after(DEADLINE):
            return await fn()
    return trio.run(main)


# ------------------------------------------------------------------ records and keys
def _pair() -> tuple[bulk.Keys, bulk.Keys]:
    cn, sn, ticket = os.urandom(32), os.urandom(32), os.urandom(32)
    return (derive_keys(cn, sn, ticket, "files", "client", "server", client=True),
            derive_keys(cn, sn, ticket, "files", "client", "server", client=False))


def test_keys_pair_up_and_depend_on_everything():
    client, server = _pair()
    assert client.send == server.recv and client.recv == server.send and client.send != client.recv
    cn, sn, t = os.urandom(32), os.urandom(32), os.urandom(32)
    base = derive_keys(cn, sn, t, "files", "a", "b", client=True)
    for changed in (derive_keys(cn, sn, t, "rpc", "a", "b", client=True),
                    derive_keys(cn, sn, os.urandom(32), "files", "a", "b", client=True),
                    derive_keys(cn, sn, t, "files", "a", "c", client=True),
                    derive_keys(os.urandom(32), sn, t, "files", "a", "b", client=True)):
        assert changed.send != base.send


def _split(rec: bytes) -> tuple[bytes, bytes]:
    return rec[:4], rec[4:]


def test_records_open_in_order_and_nothing_else():
    key = os.urandom(32)
    sealer = Sealer(key)
    recs = [sealer.seal(b"first"), sealer.seal(b""), sealer.seal(os.urandom(1000))]
    assert b"first" not in recs[0]                      # encrypted
    opener = Opener(key)
    assert opener.open(*_split(recs[0])) == b"first"
    assert opener.open(*_split(recs[1])) == b""
    assert len(opener.open(*_split(recs[2]))) == 1000

    def fresh_fails(rec: bytes, *, skip: int = 0, key: bytes = key) -> None:
        o = Opener(key)
        for r in recs[:skip]:
            o.open(*_split(r))
        with pytest.raises(ChannelBroken, match="authentication"):
            o.open(*_split(rec))

    tampered = bytearray(recs[0])
    tampered[10] ^= 1
    fresh_fails(bytes(tampered))                        # altered
    fresh_fails(recs[1])                                # reordered (record 1 first)
    fresh_fails(recs[0], skip=1)                        # replayed
    fresh_fails(recs[0], key=os.urandom(32))            # another key
    hdr = bytearray(recs[0][:4])
    hdr[3] ^= 1                                         # the length is authenticated too
    with pytest.raises(ChannelBroken):
        Opener(key).open(bytes(hdr), recs[0][4:])
    with pytest.raises(ChannelBroken, match="record length"):
        Opener.length(struct.pack(">I", bulk.MAX_RECORD + 1))


def test_sync_channel_over_a_socketpair_and_a_peer_that_closes_mid_record():
    a, b = socket.socketpair()
    ka, kb = _pair()
    ca, cb = bulk.SyncChannel(a, ka, timeout=5), bulk.SyncChannel(b, kb, timeout=5)
    big = os.urandom(3 * bulk.RECORD + 7)            # several records
    threading.Thread(target=ca.send, args=(big,)).start()
    got = bytearray()
    while len(got) < len(big):
        got += cb.recv()
    assert bytes(got) == big
    a.sendall(struct.pack(">I", 100) + b"x" * 10)    # a record cut short
    a.close()
    with pytest.raises(ChannelBroken, match="mid-record"):
        cb.recv()
    b.close()


def test_a_stalled_sync_channel_gives_up():
    a, b = socket.socketpair()
    _, kb = _pair()
    with pytest.raises(ChannelBroken, match="stall"):
        bulk.SyncChannel(b, kb, timeout=0.2).recv()
    a.close()
    b.close()


def test_run_blocking_unblocks_its_thread_when_cancelled():
    a, b = socket.socketpair()
    ended = threading.Event()

    def blocked() -> None:
        try:
            b.recv(10)                                  # nothing ever comes
        finally:
            ended.set()

    async def main() -> None:
        with trio.move_on_after(0.2) as scope:
            await bulk.run_blocking(blocked, abort=bulk.shutdown(b))
        assert scope.cancelled_caught and ended.is_set()
        # and an exception in the thread comes out as itself, not in a group
        with pytest.raises(ZeroDivisionError):
            await bulk.run_blocking(lambda: 1 / 0, abort=lambda: None)

    run(main)
    a.close()
    b.close()


def test_ips_of_multiaddrs():
    assert bulk.ips_of(["/ip4/10.0.0.2/tcp/1/p2p/x", "/ip6/::1/tcp/2", "/dns4/node-b/tcp/3",
                        "/ip4/10.0.0.2/tcp/9", "garbage"]) == ["10.0.0.2", "::1", "node-b"]


# ------------------------------------------------------------------ listener and tickets
def test_tickets_are_one_use_and_expire_and_strangers_are_dropped():
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(bulk.BulkServer(host="127.0.0.1", peer_id="srv").serve)
            assert server.offer("peer", "files", {"v": 1, "nonce": b"short"}) is None
            assert server.offer("peer", "files", None) is None
            nonce, hello = bulk.client_hello()
            offer = server.offer("peer", "files", hello)
            conn, keys = await bulk.connect(["127.0.0.1"], offer.wire, nonce, "files", "peer", "srv")
            sock = await offer.accept(server)
            assert sock is not None
            theirs = bulk.TrioChannel(bulk.to_trio(sock), offer.keys)
            ours = bulk.TrioChannel(conn, keys)
            await ours.send(b"hello")
            assert await theirs.recv() == b"hello"
            nursery.start_soon(theirs.send, b"x" * (bulk.RECORD + 1))   # two records
            assert len(await ours.recv()) == bulk.RECORD and await ours.recv() == b"x"
            # the same ticket again: the server hangs up at once
            again, _ = await bulk.connect(["127.0.0.1"], offer.wire, nonce, "files", "peer", "srv")
            assert await again.receive_some(10) == b""
            # a stranger with a made-up ticket
            with trio.fail_after(5):
                stranger = await trio.open_tcp_stream("127.0.0.1", server.port)
                await stranger.send_all(os.urandom(32))
                assert await stranger.receive_some(10) == b""
            # a ticket nobody used expires; its connection is refused afterwards
            nonce2, hello2 = bulk.client_hello()
            late = server.offer("peer", "files", hello2)
            late.expires = trio.current_time()
            assert await late.accept(server) is None
            c3, _ = await bulk.connect(["127.0.0.1"], late.wire, nonce2, "files", "peer", "srv")
            assert await c3.receive_some(10) == b""
            # wrong keys: a record from a client that derived other keys fails to open
            nonce3, hello3 = bulk.client_hello()
            offer3 = server.offer("peer", "files", hello3)
            c4, k4 = await bulk.connect(["127.0.0.1"], offer3.wire, os.urandom(32), "files",
                                        "peer", "srv")
            s4 = await offer3.accept(server)
            await bulk.TrioChannel(c4, k4).send(b"hi")
            with pytest.raises(ChannelBroken, match="authentication"):
                await bulk.TrioChannel(bulk.to_trio(s4), offer3.keys).recv()
            for s in (ours, theirs):
                await s.aclose()
            for c in (again, stranger, c3, c4):
                await c.aclose()
            # a malformed offer and an address nobody listens on
            with pytest.raises(ChannelBroken, match="malformed"):
                await bulk.connect(["127.0.0.1"], {"port": "x"}, nonce, "files", "a", "b")
            with pytest.raises(ChannelBroken, match="cannot reach"):
                await bulk.connect(["127.0.0.1"], {**offer.wire, "port": 9}, nonce, "files",
                                   "a", "b")
            nursery.cancel_scope.cancel()

    run(main)


def test_a_port_in_use_leaves_the_side_channel_off():
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            async with trio.open_nursery() as nursery:
                server = await nursery.start(bulk.BulkServer(
                    host="127.0.0.1", port=taken.getsockname()[1], peer_id="s").serve)
                assert server.port is None
                assert server.offer("p", "files", bulk.client_hello()[1]) is None
                nursery.cancel_scope.cancel()

    run(main)


# ------------------------------------------------------------------ the tunnel's codec
def _msg(cmd: int, payload: bytes) -> bytes:
    return bytes([cmd]) + len(payload).to_bytes(8, "little") + payload


def _tensor(name: str, tid: int) -> bytes:
    t = bytearray(tunnel.TENSOR_BYTES)
    t[:8] = tid.to_bytes(8, "little")
    t[tunnel.NAME_AT:tunnel.NAME_AT + len(name)] = name.encode()
    return bytes(t)


def _set(name: str, tid: int, data: bytes, offset: int = 0) -> bytes:
    return _msg(tunnel.SET_TENSOR, _tensor(name, tid) + b"\0" + offset.to_bytes(8, "little") + data)


def _expand(records: list[bytes]) -> bytes:
    """What the lender writes to its RPC server for these tunnel records."""
    ex, out = tunnel.Expander(), bytearray()
    for rec in records:
        seen: list[bytes] = []
        for t, body in tunnel._decode(rec):
            if t == tunnel.RAW:
                out += body
            else:
                msg = ex.decode(t, body, seen)
                if msg is not None:
                    out += msg
    return bytes(out)


def test_compressor_round_trip_and_per_token_size():
    comp = tunnel.Compressor()
    mask = bytearray(1024)
    records, sent, written = [], [], b""
    for token in range(4):
        hidden = os.urandom(2304)
        mask[token * 4:token * 4 + 4] = b"\xff\xff\xff\xff"        # one more cell per token
        batch = [_set("ffn_out", 1, hidden), _set("ffn_inp", 2, hidden),   # same data twice
                 _set("kq_mask", 3, bytes(mask)), _msg(16, b"\0" * 4),
                 _msg(8, _tensor("l_out", 4) + bytes(16))]
        seen: list[bytes] = []
        records.append(tunnel._encode([s for m in batch for s in comp.encode(m, seen)]))
        sent.append(len(records[-1]))
        written += b"".join(batch)
    assert _expand(records) == written                   # the lender rebuilds every byte
    raw = len(b"".join(batch))
    # after the first token the heads are known: the hidden state once, plus little
    assert sent[-1] < 2304 + 200 < raw, (sent, raw)


def test_expander_refuses_what_it_was_never_told():
    ex = tunnel.Expander()
    with pytest.raises(ChannelBroken, match="never defined"):
        ex.decode(tunnel.USE, memoryview(struct.pack(">I", 7) + b"data"), [])
    with pytest.raises(ChannelBroken):
        tunnel._decode(b"\x09\x00\x00\x00\x01x")                  # unknown type
    with pytest.raises(ChannelBroken):
        tunnel._decode(b"\x00\x00\x00\x00\x09x")                  # longer than the record


def test_requests_batch_until_an_answered_command_and_keep_weights_whole():
    r = tunnel.Requests(collect=True)
    weight = _set("blk.0.w", 1, os.urandom(10_000))
    small = _msg(16, b"\0" * 4)
    get = _msg(8, _tensor("x", 2) + bytes(16))
    data = weight + small + get
    outs = []
    for i in range(0, len(data), 333):                    # in arbitrary pieces
        out = r.feed(data[i:i + 333])
        if out is not None:
            outs += out
    assert [k for k, _ in outs] == [tunnel.Requests.SET, tunnel.Requests.MSG, tunnel.Requests.MSG]
    assert [b for _, b in outs] == [weight, small, get]
    big = _msg(6, b"z" * (2 * tunnel.BUFFER))            # not a SET candidate: streams
    r2 = tunnel.Requests(collect=False)
    out = r2.feed(big[:tunnel.BUFFER + 100])
    assert out and out[0][0] == tunnel.RAW
    assert b"".join(b for _, b in out + r2.take(final=True) + (r2.feed(big[tunnel.BUFFER + 100:]) or [])
                    + r2.take(final=True)) == big
    r3 = tunnel.Requests(collect=True)                    # not llama.cpp protocol 7
    assert r3.feed(b"\xfe" + bytes(20)) == [(tunnel.RAW, b"\xfe" + bytes(20))] and not r3.enabled


def test_fill_matches_only_the_files_own_bytes(tmp_path: Path):
    blob = os.urandom(3 * 8192)
    path = tmp_path / "model.bin"
    path.write_bytes(blob)
    model = tunnel.ModelFile(sha256="0" * 64, path=str(path),
                             tensors={"blk.0.w": (8192, 8192), "blk.1.w": (16384, 8192)})
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        good = _set("blk.0.w", 1, blob[8192:16384])
        fill = tunnel.match_fill(good, model, mm)
        assert fill is not None
        (plen,) = struct.unpack_from(">I", fill)
        assert fill[4:4 + plen] == good[:tunnel.SET_HEADER]
        assert struct.unpack_from(">QQ", fill, 4 + plen) == (8192, 8192)
        part = _set("blk.1.w", 1, blob[16384 + 4096:], offset=4096)   # a tensor's tail
        assert struct.unpack_from(">QQ", tunnel.match_fill(part, model, mm),
                                  4 + plen) == (16384 + 4096, 4096)
        changed = bytearray(blob[8192:16384])
        changed[-1] ^= 1
        assert tunnel.match_fill(_set("blk.0.w", 1, bytes(changed)), model, mm) is None
        assert tunnel.match_fill(_set("blk.9.w", 1, blob[8192:16384]), model, mm) is None
        assert tunnel.match_fill(_set("blk.0.w", 1, blob[8192:16384], offset=4096), model, mm) is None
