"""Split models over llama.cpp RPC through the mesh (node/splits.py, mesh/tunnel.py).

Placement unit tests first (pure functions), then three `mesh up` processes on 127.0.0.1
sharing one token: `a` loads SmolLM2, `b` and `c` lend 1 GiB each and serve no model.
"""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx
import openai
import psutil
import pytest

from mesh.tunnel import BUFFER, RpcBatcher
from node.placement import (OVERHEAD, CannotFit, ModelInfo, PeerOffer, estimate, model_info,
                            place)
from tests.procs import MeshNode, models_dir, run_cli

CHAT = "smollm2-135m-instruct"
GiB = 2**30
MiB = 2**20
PROMPT = "The capital of France is"


# ------------------------------------------------------------------ placement
def _info(n_layer=30, layer=20 * MiB, fixed=60 * MiB, kv=768) -> ModelInfo:
    return ModelInfo(n_layer=n_layer, layer_bytes=(layer,) * n_layer, fixed_bytes=fixed,
                     kv_per_layer_token=kv)


def test_gguf_header_gives_layers_and_kv_width():
    path = models_dir() / CHAT / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip("SmolLM2 is not installed in the test models dir")
    info = model_info(str(path))
    assert info.n_layer == 30
    assert info.kv_per_layer_token == (64 + 64) * 3 * 2      # head_dim 64, 3 KV heads, f16
    assert 0.9 * path.stat().st_size < info.weights <= path.stat().st_size
    assert estimate(info, 8192) == info.weights + 30 * 8192 * 768 + OVERHEAD


def test_no_split_unless_asked():
    p = place(_info(), n_ctx=1024, local_free=8 * GiB, split=False,
              peers=[PeerOffer("p1", "b", GiB, GiB)])
    assert not p.split and p.shares[0].layers == 30


def test_split_when_asked_spreads_over_every_peer_by_free_memory():
    peers = [PeerOffer("p1", "b", 4 * GiB, 2 * GiB, rtt_ms=1),
             PeerOffer("p2", "c", 4 * GiB, 1 * GiB, rtt_ms=1)]
    p = place(_info(), n_ctx=1024, local_free=3 * GiB, split=True, peers=peers, me="me")
    d = p.describe()
    assert [s.name for s in p.shares] == ["local", "b", "c"]
    assert sum(d["layers"]) == 30 and d["layers"][1] > d["layers"][2] > 0


def test_fewest_peers_when_it_does_not_fit_and_rtt_counts():
    info = _info(layer=100 * MiB)                      # ~3 GiB of layers
    near = PeerOffer("near", "near", 4 * GiB, 3 * GiB, rtt_ms=0.5)
    far = PeerOffer("far", "far", 8 * GiB, 4 * GiB, rtt_ms=200)
    p = place(info, n_ctx=1024, local_free=1 * GiB, split=True, peers=[far, near], me="me")
    assert [s.peer_id for s in p.peers] == ["near"]
    assert sum(s.layers for s in p.shares) == 30
    for s in p.peers:
        assert s.bytes <= near.free


def test_busy_dead_and_excluded_peers_are_skipped():
    peers = [PeerOffer("busy", "x", GiB, GiB, used_by="someone-else"),
             PeerOffer("dead", "y", GiB, GiB, alive=False),
             PeerOffer("gone", "z", GiB, GiB),
             PeerOffer("mine", "w", GiB, 0, used_by="me")]   # held by us: counts in full
    p = place(_info(), n_ctx=1024, local_free=8 * GiB, split=True, peers=peers, me="me",
              exclude=frozenset({"gone"}))
    assert [s.peer_id for s in p.peers] == ["mine"]


def test_cannot_fit_says_why():
    with pytest.raises(CannotFit, match="needs about"):
        place(_info(layer=500 * MiB), n_ctx=1024, local_free=1 * GiB, split=True,
              peers=[PeerOffer("p1", "b", GiB, GiB)])


# ------------------------------------------------------------------ tunnel batching
def _cmd(c: int, payload: bytes = b"") -> bytes:
    return bytes([c]) + len(payload).to_bytes(8, "little") + payload


def test_batcher_holds_fire_and_forget_commands_until_one_that_is_answered():
    b = RpcBatcher()
    assert b.feed(_cmd(14, b"h" * 24)) is not None            # HELLO is answered: at once
    assert b.feed(_cmd(6, b"x" * 100)) is None                # SET_TENSOR: held
    assert b.feed(_cmd(16, b"\0" * 4)) is None               # GRAPH_RECOMPUTE: held
    get = _cmd(8, b"g" * 40)                                   # GET_TENSOR, in two reads
    assert b.feed(get[:3]) is None
    assert b.feed(get[3:]) == _cmd(6, b"x" * 100) + _cmd(16, b"\0" * 4) + get
    assert not b.holding
    big = _cmd(6, b"w" * BUFFER)                               # a weight upload streams
    assert b.feed(big[:BUFFER]) is not None
    assert b.feed(big[BUFFER:]) is None and b.take() == big[BUFFER:]
    assert b.feed(_cmd(200)) is not None and not b.enabled    # unknown protocol: pass-through
    assert b.feed(_cmd(6, b"y")) == _cmd(6, b"y")


def test_batcher_holds_a_reply_until_it_is_whole():
    r = RpcBatcher(replies=True)
    assert r.feed((4).to_bytes(8, "little")) is None
    assert r.feed(b"ab") is None
    assert r.feed(b"cd") == (4).to_bytes(8, "little") + b"abcd"


# ------------------------------------------------------------------ three nodes
def eventually(fn, timeout=20.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except (httpx.HTTPError, AssertionError, KeyError, StopIteration):
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def node_entry(node, name):
    nodes = httpx.get(node.api + "/mesh/status", timeout=5).json()["nodes"]
    return next(n for n in nodes if n["name"] == name)


def model_entry(node, name=None):
    n = node_entry(node, name or node.args[node.args.index("--name") + 1])
    return next(m for m in n["models"] if m["id"] == CHAT)


def greedy(node, max_tokens=24) -> str:
    r = httpx.post(node.v1 + "/completions", timeout=120, json={
        "model": CHAT, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "seed": 1})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    token = run_cli("token").stdout.strip()
    tmp = tmp_path_factory.mktemp("split")
    env = {"MESH_RPC_THREADS": "1"}     # 3 nodes on a small machine: no spinning thread pools
    a = MeshNode(tmp / "a", ["--name", "a", "--token", token, "--no-mdns", "--model", CHAT],
                 env=env).start()
    a_addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready()
    lenders = [MeshNode(tmp / n, ["--name", n, "--no-models", "--token", token, "--no-mdns",
                                  "--peer", a_addr, "--offer-memory", "1GiB"], env=env).start()
               for n in ("b", "c")]
    for n in lenders:
        n.wait_ready()
    nodes = {"a": a, "b": lenders[0], "c": lenders[1]}
    for n in ("b", "c"):
        assert eventually(lambda: node_entry(a, n)["state"] == "alive"
                          and node_entry(a, n)["rpc"]["free"] > 0), f"a does not see {n} lending"
    yield nodes
    for n in nodes.values():
        n.stop()


def _rpc_server(node) -> psutil.Process:
    kids = psutil.Process(node.proc.pid).children(recursive=True)
    return next(k for k in kids if "node.rpc" in " ".join(k.cmdline()))


def test_rpc_server_listens_on_loopback_only(mesh):
    srv = _rpc_server(mesh["b"])
    listening = [c for c in srv.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
    port = listening[0].laddr.port
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for ip in others:
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((ip, port)) != 0, f"the RPC port answers on {ip}"


def test_split_gives_the_same_greedy_text_and_peers_hold_tensors(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    unsplit = greedy(a)
    assert unsplit.strip()
    assert httpx.post(a.api + "/mesh/models/unload", json={"id": CHAT}, timeout=30).status_code == 200
    before = {n: node_entry(a, n)["rpc"]["free"] for n in ("b", "c")}

    t0 = time.monotonic()
    r = run_cli("load", CHAT, "--split", "--url", a.api, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "split over a" in r.stdout and " b " in r.stdout and " c " in r.stdout, r.stdout
    load_s = time.monotonic() - t0
    m = model_entry(a)
    assert m["state"] == "loaded" and m["split"]["nodes"][0] == "a", m
    assert sorted(m["split"]["nodes"]) == ["a", "b", "c"], m
    assert all(k >= 1 for k in m["split"]["layers"]) and sum(m["split"]["layers"]) == 30

    assert greedy(a) == unsplit                          # same tokens, split or not

    # the peers' RPC servers hold the layers: their memory grew, gossip says so
    a_id = httpx.get(a.api + "/mesh/status", timeout=5).json()["self"]["id"]
    for n, node in (("b", b), ("c", c)):
        me = httpx.get(node.api + "/mesh/status", timeout=5).json()["nodes"][0]
        assert eventually(lambda node=node: httpx.get(node.api + "/mesh/status", timeout=5)
                          .json()["nodes"][0]["rpc"]["used"] > 4 * MiB), me["rpc"]
        assert me["rpc"]["holder"] == a_id
        assert eventually(lambda n=n: node_entry(a, n)["rpc"]["free"] < before[n] - 4 * MiB)
    # every node's `mesh status` shows the split and who holds the parts
    st = json.loads(run_cli("status", "--json", "--url", c.api).stdout)
    seen = next(x for x in next(n for n in st["nodes"] if n["name"] == "a")["models"]
                if x["id"] == CHAT)
    assert seen["split"]["nodes"] == m["split"]["nodes"]
    table = run_cli("status", "--url", b.api).stdout
    assert "split: " + "+".join(m["split"]["nodes"]) in table
    # the tunnels carried the traffic; a handful of KB per token once loaded
    tun = model_entry(a)["split"]["tunnels"]
    assert tun["b"]["sent"] > 2 * MiB and tun["c"]["sent"] > 2 * MiB
    print(f"split load {load_s:.1f} s; tunnels {tun}")


def test_killed_peer_ends_the_stream_with_an_error_and_the_model_is_placed_again(mesh):
    a, c = mesh["a"], mesh["c"]
    if sorted(model_entry(a).get("split", {}).get("nodes") or []) != ["a", "b", "c"]:
        pytest.skip("needs the split from the previous test")
    client = openai.OpenAI(base_url=a.v1, api_key="x", max_retries=0, timeout=60)
    got, t_kill = [], None
    with pytest.raises(openai.APIError) as err:
        stream = client.chat.completions.create(
            model=CHAT, stream=True, max_tokens=2000, temperature=0,
            messages=[{"role": "user", "content": "Write a very long story about a dragon."}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
            if len(got) == 5 and t_kill is None:
                c.stop(sig=9)
                t_kill = time.monotonic()
    assert t_kill is not None and time.monotonic() - t_kill < 15, "the stream hung"
    assert "'c'" in str(err.value) and "went away" in str(err.value), str(err.value)

    def replaced():
        m = model_entry(a)
        return m["state"] == "loaded" and m["split"]["nodes"] == ["a", "b"] and m
    m = eventually(replaced, timeout=60)
    assert m, model_entry(a)
    assert "'c'" in m["split"]["failure"] and "went away" in m["split"]["failure"]
    assert greedy(a, max_tokens=8).strip()
    # c's RPC server died with its node (no orphan lending memory to nobody)
    def orphans():
        return [p for p in psutil.process_iter(["cmdline"])
                if "node.rpc" in " ".join(p.info["cmdline"] or [])
                and str(c.home) in " ".join(p.info["cmdline"] or [])]
    assert eventually(lambda: not orphans(), timeout=5), orphans()


def test_unload_gives_the_lent_memory_back(mesh):
    a, b = mesh["a"], mesh["b"]
    if not (model_entry(a).get("split") or {}).get("peers"):
        pytest.skip("needs a split model")
    r = httpx.post(a.api + "/mesh/models/unload", json={"id": CHAT}, timeout=30)
    assert r.status_code == 200, r.text

    def released():
        me = httpx.get(b.api + "/mesh/status", timeout=5).json()["nodes"][0]["rpc"]
        return me["used"] < 4 * MiB and me["clients"] == 0 and me
    assert eventually(released, timeout=15), httpx.get(b.api + "/mesh/status").json()["nodes"][0]["rpc"]
    # and the holder lets go, so another node could borrow it
    assert eventually(lambda: node_entry(a, "b")["rpc"]["used_by"] == "", timeout=15)


def test_a_peer_that_hangs_fails_the_request_within_seconds(mesh):
    """A frozen peer (SIGSTOP: its connection stays open, nothing comes back) is caught by
    gossip liveness: the request ends with an error instead of waiting forever."""
    a, b = mesh["a"], mesh["b"]
    if mesh["c"].proc.poll() is None:
        pytest.skip("runs after c was killed")
    r = httpx.post(a.api + "/mesh/models/load", json={"id": CHAT, "split": True}, timeout=120)
    assert r.status_code == 200 and r.json()["split"]["nodes"] == ["a", "b"], r.text
    client = openai.OpenAI(base_url=a.v1, api_key="x", max_retries=0, timeout=60)
    got, t_stop = 0, None
    try:
        with pytest.raises(openai.APIError) as err:
            stream = client.chat.completions.create(
                model=CHAT, stream=True, max_tokens=2000, temperature=0,
                messages=[{"role": "user", "content": "Write a very long story about a dragon."}])
            for chunk in stream:
                got += 1
                if got == 5:
                    b.proc.send_signal(signal.SIGSTOP)
                    t_stop = time.monotonic()
        assert t_stop is not None and time.monotonic() - t_stop < 15, "the stream hung"
        assert "'b'" in str(err.value) and "stopped answering" in str(err.value), str(err.value)
        # nobody left to lend: SmolLM2 fits here, so it is loaded here alone
        m = eventually(lambda: model_entry(a)["state"] == "loaded" and model_entry(a), timeout=60)
        assert m and m["split"]["nodes"] == ["a"] and "'b'" in m["split"]["failure"], m
    finally:
        b.proc.send_signal(signal.SIGCONT)
