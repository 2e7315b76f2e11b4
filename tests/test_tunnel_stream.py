"""A split whose lender offers no side channel (MESH_BULK_PORT=-1): the RPC tunnel's bytes
go on the libp2p stream itself (mesh/tunnel.py: the relay threads' socketpair, carried to
the stream by `_Ends.join`). Two `mesh up` processes on 127.0.0.1: `a` loads SmolLM2,
capped so that a split is not pointless; `b` lends memory and holds the model file."""

from __future__ import annotations

import pytest

from tests.procs import MeshNode, run_cli
from tests.test_split import CHAT, eventually, greedy, kill_mid_stream, model_entry, node_entry


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    token = run_cli("token").stdout.strip()
    tmp = tmp_path_factory.mktemp("tunnel-stream")
    env = {"MESH_RPC_THREADS": "1"}
    a = MeshNode(tmp / "a", ["--name", "a", "--token", token, "--no-mdns", "--model", CHAT],
                 env={**env, "MESH_MEMORY_LIMIT": "256MiB"}).start()
    a_addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready()
    b = MeshNode(tmp / "b", ["--name", "b", "--no-models", "--token", token, "--no-mdns",
                             "--peer", a_addr, "--offer-memory", "1GiB"],
                 env={**env, "MESH_BULK_PORT": "-1"}).start()
    b.wait_ready()
    assert eventually(lambda: node_entry(a, "b")["state"] == "alive"
                      and node_entry(a, "b")["rpc"]["free"] > 0), "a does not see b lending"
    yield {"a": a, "b": b}
    for n in (a, b):
        n.stop()


def test_a_split_over_the_libp2p_stream_answers_as_unsplit(mesh):
    a = mesh["a"]
    unsplit = greedy(a)
    assert unsplit.strip()
    assert run_cli("unload", CHAT, "--url", a.api).returncode == 0
    r = run_cli("load", CHAT, "--split", "--url", a.api, timeout=300)
    assert r.returncode == 0, r.stderr
    m = model_entry(a)
    assert m["state"] == "loaded" and m["split"]["nodes"] == ["a", "b"], m
    assert greedy(a) == unsplit
    tun = model_entry(a)["split"]["tunnels"]["b"]
    assert tun["via"] == "libp2p stream", tun
    assert tun["filled"] > 0 and tun["received"] > 0, tun      # FILLs and replies both ways


def test_a_lender_killed_mid_stream_ends_it_with_an_error_naming_it(mesh):
    a, b = mesh["a"], mesh["b"]
    if model_entry(a).get("split", {}).get("nodes") != ["a", "b"]:
        pytest.skip("needs the split from the previous test")
    err = kill_mid_stream(a, b)
    # the tunnel's reason, not llama.cpp's abort ("the worker ... died")
    assert "'b'" in err and "died" not in err, err
