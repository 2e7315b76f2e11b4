"""Node admission you can revoke: `mesh nodes` lists every node ever admitted, and
`mesh nodes revoke` makes every node drop and refuse it, mesh-wide and persistent."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.procs import MeshNode, run_cli


def _alive(node) -> set[str]:
    return {n["name"] for n in httpx.get(node.api + "/mesh/status", timeout=5).json()["nodes"]
            if n["state"] == "alive"}


def _until(pred, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _nodes(node) -> dict[str, dict]:
    r = run_cli("nodes", "list", "--json", "--url", node.api)
    assert r.returncode == 0, r.stderr
    return {n["name"]: n for n in json.loads(r.stdout)}


@pytest.fixture
def mesh(tmp_path):
    token = run_cli("token").stdout.strip()
    a = MeshNode(tmp_path / "a", ["--name", "a", "--no-models", "--no-mdns", "--token", token]).start()
    addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready()
    others = [MeshNode(tmp_path / n, ["--name", n, "--no-models", "--no-mdns", "--token", token,
                                       "--peer", addr]).start() for n in ("b", "c")]
    for n in others:
        n.wait_ready()
    nodes = {"a": a, "b": others[0], "c": others[1], "token": token, "addr": addr,
             "tmp": tmp_path}
    yield nodes
    for n in (a, *others):
        n.stop()


def test_a_revoked_node_is_dropped_everywhere_and_cannot_come_back(mesh) -> None:
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    _until(lambda: _alive(b) >= {"a", "c"} and _alive(a) >= {"b", "c"}, "the mesh to form")
    def every():
        n = _nodes(a)
        return n if set(n) >= {"a", "b", "c"} else None
    listed = _until(every, "a to list every node")
    assert listed["a"]["self"] and listed["c"]["connected"] and not listed["c"]["revoked"]
    c_id = listed["c"]["peer_id"]
    r = run_cli("nodes", "revoke", "c", "--url", a.api)
    assert r.returncode == 0, r.stderr
    assert c_id in r.stdout
    # a and b both drop it; c is left alone; b learned the revocation by gossip
    _until(lambda: "c" not in _alive(a) and "c" not in _alive(b), "a and b to drop c")
    _until(lambda: not httpx.get(c.api + "/mesh/nodes", timeout=5).json()["data"]
           or not any(n["connected"] for n in httpx.get(c.api + "/mesh/nodes").json()["data"]
                      if not n["self"]), "c to lose its connections")
    assert _until(lambda: _nodes(b).get("c", {}).get("revoked"), "b to record the revocation")
    # c restarts with its identity (same home) and the token: it is refused
    c.stop()
    c = MeshNode(mesh["tmp"] / "c", ["--name", "c", "--no-models", "--no-mdns", "--token",
                                      mesh["token"], "--peer", mesh["addr"]]).start().wait_ready()
    try:
        deadline = time.monotonic() + 8         # several dial rounds (backoff <= 5 s)
        while time.monotonic() < deadline:
            assert "c" not in _alive(a) and "c" not in _alive(b) and _alive(c) <= {"c"}
            time.sleep(0.5)
    finally:
        c.stop()
    assert "revoked" in (mesh["tmp"] / "a" / "nodes.json").read_text()     # persistent


def test_revoking_errors_are_one_readable_line(mesh) -> None:
    a = mesh["a"]
    r = run_cli("nodes", "revoke", "nobody-by-that-name", "--url", a.api)
    assert r.returncode == 1 and "404" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("nodes", "revoke", "a", "--url", a.api)
    assert r.returncode == 1 and "cannot revoke itself" in r.stderr
