"""The p2p layer with real libp2p hosts on 127.0.0.1.

Each multi-node test runs in one ``trio.run`` (no pytest-trio) under a hard deadline, and
synchronises on the view's change event (``View.wait_for``), never on bare sleeps.
Pure parts (token, wire, view) are tested without I/O.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import trio
from pydantic import ValidationError

from api.errors import status_of
from mesh.errors import AdmissionDenied, BadRequest, PeerError
from mesh.p2p.gossip import TOPIC
from mesh.p2p.identity import IDENTITY_FILE, load_or_create_identity, peer_id_of
from mesh.p2p import P2P, Stream, open_p2p
from mesh.token import MeshKeys, Token, load_token, new_token, parse_token, store_token
from mesh.view import (
    DROP_AFTER,
    SUSPECT_AFTER,
    Connected,
    Disconnected,
    Membership,
    RttMeasured,
    StateSeen,
    Tick,
    apply,
)
from mesh.wire.state import BadMessage, ModelState, NodeState, open_sealed, seal

DEADLINE = 30.0  # s per multi-node test; each takes 1-4 s


def run(fn: Callable[[], Awaitable[Any]], deadline: float = DEADLINE) -> Any:
    async def main() -> Any:
        with trio.fail_after(deadline):
            return await fn()

    return trio.run(main)


@asynccontextmanager
async def node(tmp: Path, token: Token, name: str, peers: list[str] = (), **state: Any) -> AsyncIterator[P2P]:
    current = {"state": NodeState(name=name, **state)}
    async with open_p2p(home=tmp / name, token=token, name=name, listen_host="127.0.0.1", p2p_port=0,
                        peers=list(peers), mdns=False, state=lambda: current["state"]) as p2p:
        p2p.test_state = current  # type: ignore[attr-defined]  # lets a test change what it gossips
        yield p2p


def alive(*peers: P2P) -> Callable[[Any], bool]:
    ids = {p.peer_id for p in peers}
    return lambda v: ids <= {p.peer_id for p in v.peers() if p.status == "alive"}


class SplitToken(Token):
    """Same pnet key, different HMAC key: gets through pnet, must fail the admission handshake."""

    @cached_property
    def keys(self) -> MeshKeys:
        k = super().keys
        return MeshKeys(psk=k.psk, hmac_key=hashlib.sha256(b"other" + k.hmac_key).digest(), mesh_id=k.mesh_id)


# --------------------------------------------------------------------------- token


def test_token_round_trip_and_keys(tmp_path: Path) -> None:
    s = new_token()
    t = parse_token(s)
    assert s.startswith("mesh1-") and t.encode() == s
    assert parse_token(s.upper()).secret == t.secret           # case-insensitive
    assert parse_token(s[:20] + "\n " + s[20:]) == t            # whitespace from copy-paste
    k = t.keys
    assert len(k.psk) == 32 and len(k.hmac_key) == 32 and k.psk != k.hmac_key
    assert len(k.mesh_id) == 10 and int(k.mesh_id, 16) >= 0
    assert parse_token(new_token()).keys.mesh_id != k.mesh_id
    assert s[6:] not in repr(t) and s[6:] not in str(t) and "psk" not in repr(k).split("mesh_id")[0]
    boot = ["/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWKeiubHfM9aMzGEB1CWmojUsSmWpwvPZMpQN35dzBYgz2"]
    assert parse_token(new_token(boot)).bootstrap == tuple(boot)

    path = store_token(tmp_path, t)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_token(tmp_path) == t
    assert load_token(tmp_path / "nowhere") is None


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("hello", "must start with 'mesh1-'"),
    ("mesh2-aaaa", "unsupported mesh token version"),
    ("mesh1-abc!def", "unexpected character"),
    ("mesh1-aaaa", "cut off"),
])
def test_token_parse_errors_are_readable(text: str, says: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_token(text)
    assert says in e.value.message
    assert status_of(e.value) == 400 and e.value.param == "token"


def test_token_typo_is_caught_by_checksum() -> None:
    s = new_token()
    i = 20
    typo = s[:i] + ("a" if s[i] != "a" else "b") + s[i + 1:]
    with pytest.raises(BadRequest, match="checksum"):
        parse_token(typo)


# --------------------------------------------------------------------------- wire


def test_wire_seal_open_and_rejections() -> None:
    key, other = os.urandom(32), os.urandom(32)
    st = NodeState(node_id="n", name="a", seq=3, ts=1.5, models=[ModelState(id="m", slots=2, tokens_per_s=7)],
                   extra={"x": [1, 2]})
    assert open_sealed(seal(st, key), key) == st
    with pytest.raises(BadMessage, match="HMAC"):
        open_sealed(seal(st, key), other)
    with pytest.raises(BadMessage):
        open_sealed(b"\x93\x01\x02", key)
    with pytest.raises(BadMessage):
        open_sealed(os.urandom(64), key)
    with pytest.raises(ValidationError):
        st.name = "b"  # type: ignore[misc]  # frozen
    with pytest.raises(ValidationError):
        NodeState(seq="3")  # type: ignore[arg-type]  # strict: no coercion


# --------------------------------------------------------------------------- view (pure)


def test_view_apply_rules() -> None:
    m = Membership()
    s1 = NodeState(node_id="p", name="p", seq=1)
    m = apply(m, Connected("p"))
    m = apply(m, StateSeen("p", s1, now=10.0, wall=1e9))
    assert m.peers["p"].status == "alive" and m.peers["p"].connected
    assert apply(m, StateSeen("p", s1, now=11.0, wall=1e9)) is m          # repeat: no change
    assert apply(m, Tick(10.0 + SUSPECT_AFTER)) is m                       # not yet
    m2 = apply(m, Tick(10.0 + SUSPECT_AFTER + 0.1))
    assert m2.peers["p"].status == "suspect"
    m3 = apply(m2, StateSeen("p", NodeState(node_id="p", seq=0), now=20.0, wall=1e9))
    assert m3.peers["p"].status == "alive"                                 # suspect takes a lower seq
    assert apply(m3, StateSeen("p", NodeState(node_id="p", seq=0, name="x"), now=20.5, wall=1e9)) is m3
    m4 = apply(apply(m3, RttMeasured("p", 10.0)), RttMeasured("p", 20.0))
    assert 10.0 < m4.peers["p"].rtt_ms < 20.0
    m5 = apply(m4, Disconnected("p"))
    assert m5.peers["p"].status == "suspect" and not m5.peers["p"].connected
    assert "p" not in apply(m5, Tick(20.0 + DROP_AFTER + 1)).peers
    assert "p" in apply(apply(m5, Connected("p")), Tick(20.0 + DROP_AFTER + 1)).peers  # connected: kept


# --------------------------------------------------------------------------- live nodes


def test_three_nodes_see_each_other_and_changes_spread(tmp_path: Path) -> None:
    token = parse_token(new_token())

    async def main() -> None:
        async with node(tmp_path, token, "a", models=[ModelState(id="m1")]) as a:
            async with node(tmp_path, token, "b", [a.addrs[0]]) as b, node(tmp_path, token, "c", [a.addrs[0]]) as c:
                t0 = time.monotonic()
                for n, others in ((a, (b, c)), (b, (a, c)), (c, (a, b))):
                    assert await n.view.wait_for(alive(*others), 8), f"{n.name} sees {n.view.peers()}"
                converged = time.monotonic() - t0
                pa = b.view.get(a.peer_id)
                assert pa.state.name == "a" and pa.state.node_id == a.peer_id
                assert pa.state.models[0].id == "m1" and pa.state.addrs == a.addrs
                # b and c only know a; gossip made them meet and connect directly
                assert await b.view.wait_for(lambda v: v.get(c.peer_id).connected, 5)
                assert set(b.connected_peers()) == {a.peer_id, c.peer_id}
                assert await b.view.wait_for(lambda v: v.get(a.peer_id).rtt_ms is not None, 5)
                entry = next(e for e in b.view.status_nodes() if e["id"] == a.peer_id)
                assert entry["name"] == "a" and entry["state"] == "alive" and entry["models"][0]["id"] == "m1"
                assert entry["rtt_ms"] is not None and entry["connected"]

                # a change is published at once, not at the next tick
                a.test_state["state"] = NodeState(name="a", models=[ModelState(id="m2")])
                t1 = time.monotonic()
                a.notify_changed()
                assert await c.view.wait_for(lambda v: v.get(a.peer_id).state.models[0].id == "m2", 3)
                spread = time.monotonic() - t1
                assert spread < 0.9, spread

                # a burst of notifications is coalesced (at most 4 messages/s)
                before = a._publisher.published
                t2 = time.monotonic()
                for _ in range(50):
                    a.notify_changed()
                    await trio.sleep(0.01)
                assert a._publisher.published - before <= 4 * (time.monotonic() - t2) + 2
                print(f"converged in {converged:.2f} s, change spread in {spread * 1000:.0f} ms")

    run(main)


def test_wrong_token_is_denied_fast(tmp_path: Path) -> None:
    token = parse_token(new_token())

    async def main() -> None:
        async with node(tmp_path, token, "a") as a, node(tmp_path, token, "b") as b:
            await b.connect(a.addrs[0])
            async with node(tmp_path, parse_token(new_token()), "w", [a.addrs[0]]) as w, \
                       node(tmp_path, SplitToken(token.secret), "x", [a.addrs[0]]) as x:
                for src, dst in ((w, a), (a, w), (x, a), (a, x)):
                    t = time.monotonic()
                    with pytest.raises((AdmissionDenied, PeerError)) as e:
                        if src is a:
                            await a.connect(dst.addrs[0])
                        else:
                            await src.open_stream(dst.peer_id, "/mesh/ping/1")
                    took = time.monotonic() - t
                    assert took < 2.0, (src.name, dst.name, took, e.value)
                    assert isinstance(e.value, AdmissionDenied), e.value
                with pytest.raises(AdmissionDenied):
                    await a.open_stream(x.peer_id, "/mesh/ping/1")  # remembered as denied
                assert a.denied_count >= 2 and w.denied_count >= 1 and x.denied_count >= 1
                # the good pair keeps gossiping; the outsiders never enter a view
                assert await a.view.wait_for(alive(b), 8)
                outsiders = {w.peer_id, x.peer_id}
                for _ in range(3):  # three more gossip rounds seen by a
                    await a.view.changed.wait()
                    for n in (a, b):
                        assert not outsiders & {p.peer_id for p in n.view.peers()}
                assert len(w.view) == 0 and len(x.view) == 0
                assert w.connected_peers() == [] and x.connected_peers() == []

    run(main)


def test_forged_gossip_is_rejected(tmp_path: Path) -> None:
    token = parse_token(new_token())

    async def main() -> None:
        async with node(tmp_path, token, "a") as a, node(tmp_path, token, "b", ) as b, \
                   node(tmp_path, token, "c") as c:
            await b.connect(a.addrs[0])
            await c.connect(a.addrs[0])
            assert await b.view.wait_for(alive(a, c), 8)
            pubsub = a._publisher._pubsub
            pubsub.remove_topic_validator(TOPIC)  # let a send what a real attacker would
            before = b.rejected_gossip_count
            wrong_key = os.urandom(32)
            await pubsub.publish(TOPIC, seal(NodeState(node_id=a.peer_id, name="forged", seq=2**62), wrong_key))
            # right key, but speaking for another node
            await pubsub.publish(TOPIC, seal(NodeState(node_id=c.peer_id, name="impostor", seq=2**62),
                                             token.keys.hmac_key))
            assert await b.view.wait_for(lambda v: b.rejected_gossip_count >= before + 2, 5)
            assert b.view.get(a.peer_id).state.name == "a"
            assert b.view.get(c.peer_id).state.name == "c"

    run(main)


def test_stream_echo_10mb(tmp_path: Path) -> None:
    token = parse_token(new_token())
    size = 10 * 1024 * 1024
    data = os.urandom(size)

    async def echo(stream: Stream, peer: str) -> None:
        while chunk := await stream.read(1 << 20):
            await stream.write(chunk)
        await stream.close()

    async def main() -> None:
        async with node(tmp_path, token, "a") as a, node(tmp_path, token, "b", [a.addrs[0]]) as b:
            b.set_handler("/test/echo/1", echo)
            assert await a.view.wait_for(alive(b), 8)
            t = time.monotonic()
            async with await a.open_stream(b.peer_id, "/test/echo/1") as s:
                got = bytearray()

                async def send() -> None:
                    for i in range(0, size, 256 * 1024):
                        await s.write(data[i:i + 256 * 1024])
                    await s.close()

                async with trio.open_nursery() as n:
                    n.start_soon(send)
                    while chunk := await s.read(1 << 20):
                        got += chunk
            took = time.monotonic() - t
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            print(f"10 MiB echo in {took:.2f} s ({2 * size / took / 2**20:.0f} MiB/s both ways)")

            # request/response: half-close, then read the answer; nothing leaks
            async def upper(stream: Stream, peer: str) -> None:
                request = bytearray()
                while chunk := await stream.read():
                    request += chunk
                await stream.write(bytes(request).upper())

            b.set_handler("/test/upper/1", upper)
            sem = a._host.get_network()._stream_semaphore
            before = sem.value
            for i in range(50):
                s = await a.open_stream(b.peer_id, "/test/upper/1")
                await s.write(b"hello %d" % i)
                await s.close()
                assert await s.read_exactly(len(b"hello %d" % i)) == b"HELLO %d" % i
                assert await s.read() == b""
            assert sem.value == before

            with pytest.raises(PeerError):
                await a.open_stream(b.peer_id, "/test/nobody-serves-this/1")
            with pytest.raises(PeerError):
                await a.open_stream("not-a-peer-id", "/test/echo/1")

    run(main)


def test_identity_persists_across_restart(tmp_path: Path) -> None:
    token = parse_token(new_token())

    async def main() -> None:
        async with node(tmp_path, token, "a") as a1:
            first = a1.peer_id
        async with node(tmp_path, token, "a") as a2:
            assert a2.peer_id == first
        async with node(tmp_path, token, "other") as o:
            assert o.peer_id != first
        key = tmp_path / "a" / IDENTITY_FILE
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

    run(main)


def test_silent_or_stopped_node_goes_suspect(tmp_path: Path) -> None:
    token = parse_token(new_token())

    async def main() -> None:
        async with node(tmp_path, token, "a") as a:
            async with AsyncExitStack() as stack:
                c = await stack.enter_async_context(node(tmp_path, token, "c", [a.addrs[0]]))
                assert await a.view.wait_for(alive(c), 8)
                c_id = c.peer_id
                # c stays connected but stops gossiping (its state() fails): suspect after 3 ticks
                c.test_state["state"] = None  # the publisher cannot seal None: it skips the tick
                t = time.monotonic()
                assert await a.view.wait_for(lambda v: v.get(c_id).status == "suspect", 5)
                silent = time.monotonic() - t
                assert a.view.get(c_id).connected and SUSPECT_AFTER - 1 < silent < SUSPECT_AFTER + 1.5
                c.test_state["state"] = NodeState(name="c")
                assert await a.view.wait_for(lambda v: v.get(c_id).status == "alive", 3)
            t = time.monotonic()
            assert await a.view.wait_for(lambda v: v.get(c_id).status == "suspect", 4.5)
            gone = time.monotonic() - t
            assert not a.view.get(c_id).routable
            # c restarts with the same home: same peer id, alive again via its static peer
            async with node(tmp_path, token, "c", [a.addrs[0]]) as c2:
                assert c2.peer_id == c_id
                assert await a.view.wait_for(lambda v: v.get(c_id).status == "alive", 8)
            print(f"silent node suspect after {silent:.2f} s, stopped node after {gone:.2f} s")

    run(main)


def test_static_peer_redialed_after_restart(tmp_path: Path) -> None:
    """b keeps a as a static peer; a goes away and comes back on the same port."""
    token = parse_token(new_token())

    async def main() -> None:
        async with open_p2p(home=tmp_path / "a", token=token, name="a", listen_host="127.0.0.1", p2p_port=0,
                            peers=[], mdns=False, state=lambda: NodeState(name="a")) as a:
            addr = a.addrs[0]
            port = int(addr.split("/tcp/")[1].split("/")[0])
        async with node(tmp_path, token, "b", [addr]) as b:
            async with open_p2p(home=tmp_path / "a", token=token, name="a", listen_host="127.0.0.1",
                                p2p_port=port, peers=[], mdns=False, state=lambda: NodeState(name="a")) as a2:
                assert await b.view.wait_for(alive(a2), 10)
            assert await b.view.wait_for(lambda v: v.get(a2.peer_id).status == "suspect", 5)
            async with open_p2p(home=tmp_path / "a", token=token, name="a", listen_host="127.0.0.1",
                                p2p_port=port, peers=[], mdns=False, state=lambda: NodeState(name="a")) as a3:
                t = time.monotonic()
                assert await b.view.wait_for(lambda v: v.get(a3.peer_id).status == "alive", 10)
                print(f"static peer back after {time.monotonic() - t:.2f} s")

    run(main)


def test_token_bootstrap_and_peer_address_without_id(tmp_path: Path) -> None:
    token = parse_token(new_token())

    async def main() -> None:
        async with node(tmp_path, token, "a") as a:
            with_boot = Token(token.secret, (a.addrs[0],))          # same mesh, a as bootstrap
            no_id = a.addrs[0].split("/p2p/")[0]                     # /ip4/127.0.0.1/tcp/N
            async with node(tmp_path, with_boot, "b") as b, node(tmp_path, token, "c", [no_id]) as c:
                assert await a.view.wait_for(alive(b, c), 8)
                assert await b.view.wait_for(alive(a), 5) and await c.view.wait_for(alive(a), 5)

    run(main)


def test_own_address_as_static_peer_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A token's bootstrap list may name the node that made it: that node must not dial itself."""
    caplog.set_level(logging.DEBUG, logger="mesh.p2p.discovery")
    token = parse_token(new_token())
    me = peer_id_of(load_or_create_identity(tmp_path / "s"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    own = f"/ip4/127.0.0.1/tcp/{port}"

    async def main() -> None:
        async with open_p2p(home=tmp_path / "s", token=Token(token.secret, (f"{own}/p2p/{me}",)), name="s",
                            listen_host="127.0.0.1", p2p_port=port, peers=[own], mdns=False,
                            state=lambda: NodeState(name="s")) as s:
            assert s.peer_id == me
            with trio.fail_after(5):
                while sum("is this node" in r.getMessage() for r in caplog.records) < 2:
                    await trio.sleep(0.05)
            assert s.connected_peers() == [] and s.denied_count == 0

    run(main)


def test_mdns_finds_same_mesh_only(tmp_path: Path) -> None:
    zeroconf = pytest.importorskip("zeroconf")
    try:
        zeroconf.Zeroconf(ip_version=zeroconf.IPVersion.V4Only).close()
    except OSError as exc:
        pytest.skip(f"no multicast here: {exc}")
    token, other = parse_token(new_token()), parse_token(new_token())

    async def main() -> None:
        def mdns_node(tok: Token, name: str) -> Any:
            return open_p2p(home=tmp_path / name, token=tok, name=name, listen_host="127.0.0.1", p2p_port=0,
                            peers=[], mdns=True, state=lambda: NodeState(name=name))

        async with mdns_node(token, "a") as a, mdns_node(token, "b") as b, mdns_node(other, "o") as o:
            t = time.monotonic()
            assert await a.view.wait_for(alive(b), 10) and await b.view.wait_for(alive(a), 5)
            found = time.monotonic() - t
            assert len(o.view) == 0 and o.denied_count == 0 and a.denied_count == 0
            t = time.monotonic()
        closed = time.monotonic() - t
        assert closed < 3.0, closed
        print(f"mDNS: found in {found:.2f} s, 3 nodes closed in {closed:.2f} s")

    run(main)
