"""`mesh token rotate`: a new token for every alive node over the mesh, the old one
retired after a grace period, so a machine that kept only the old token (even with a
fresh identity, which node revocation cannot catch) cannot come back (mesh/p2p/rekey.py)."""

from __future__ import annotations

import json
import os
import stat
import time

import httpx
import pytest

from mesh.token import parse_token
from tests.procs import MeshNode, run_cli

GRACE = 25.0        # s: long enough for a node to restart inside it on a loaded machine


def _status(node) -> dict:
    return httpx.get(node.api + "/mesh/status", timeout=5).json()


def _alive(node) -> set[str]:
    return {n["name"] for n in _status(node)["nodes"] if n["state"] == "alive"}


def _until(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _node(tmp, name: str, token: str, *extra: str) -> MeshNode:
    return MeshNode(tmp / name, ["--name", name, "--no-models", "--no-mdns", "--token", token, *extra])


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """a, b, c, e on one old token; c revoked, e stopped; a rotates; e comes back (same
    home, old token) and f (fresh home, old token) joins, both inside the grace period."""
    tmp = tmp_path_factory.mktemp("rotate")
    old = run_cli("token").stdout.strip()
    a = _node(tmp, "a", old).start()
    addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready()
    peer = ["--peer", addr]
    nodes = {"a": a}
    for name in ("b", "c", "e"):
        nodes[name] = _node(tmp, name, old, *peer).start()
    for name in ("b", "c", "e"):
        nodes[name].wait_ready()
    _until(lambda: _alive(a) >= {"b", "c", "e"}, "the mesh to form")
    _until(lambda: {n["name"] for n in httpx.get(a.api + "/mesh/nodes").json()["data"]} >= {"b", "c", "e"},
           "a to note every node")
    r = run_cli("nodes", "revoke", "c", "--url", a.api)
    assert r.returncode == 0, r.stderr
    _until(lambda: "c" not in _alive(a) and "c" not in _alive(nodes["b"]), "the mesh to drop c")
    nodes["e"].stop()                                  # away during the rotation
    _until(lambda: "e" not in _alive(a), "a to see e gone")

    t0 = time.time()
    r = run_cli("token", "rotate", "--grace", str(GRACE), "--json", "--url", a.api)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    nodes["e"] = _node(tmp, "e", old, *peer).start()           # back with the old token
    nodes["f"] = _node(tmp, "f", old, *peer).start()           # a new machine with the old token
    nodes["e"].wait_ready()
    nodes["f"].wait_ready()
    yield {"nodes": nodes, "old": old, "out": out, "t0": t0, "tmp": tmp, "peer": peer}
    for n in nodes.values():
        n.stop()


def test_every_alive_node_gets_the_new_token_and_the_mesh_says_so(rotated):
    a, b = rotated["nodes"]["a"], rotated["nodes"]["b"]
    out, old = rotated["out"], parse_token(rotated["old"])
    new = parse_token(out["token"])
    assert new != old and out["mesh"] == new.mesh_id != old.mesh_id
    assert [p["name"] for p in out["delivered"]] == ["b"], out     # c is revoked, e was away
    assert out["missed"] == [], out
    assert abs(out["retire_at"] - (rotated["t0"] + GRACE)) < 10, out
    for n in (a, b):                       # stored in each home, 0600, the retiring one beside it
        assert parse_token((n.home / "token").read_text()) == new
        assert stat.S_IMODE(os.stat(n.home / "token").st_mode) == 0o600
        rot = n.home / "token-rotation.json"
        assert stat.S_IMODE(os.stat(rot).st_mode) == 0o600
        assert old.fingerprint in json.loads(rot.read_text())["superseded"]
        assert _status(n)["mesh"] == new.mesh_id
    if time.time() < out["retire_at"] - 2:
        assert any("mesh token rotated" in w for w in _status(a)["warnings"]), _status(a)["warnings"]
    # a second rotation while this one is in its grace period is refused, readably
    if time.time() < out["retire_at"] - 2:
        r = httpx.post(a.api + "/mesh/token/rotate", json={"grace_s": 30}, timeout=30)
        assert r.status_code == 409 and r.json()["error"]["code"] == "rotation_in_progress", r.text


def test_a_node_away_during_the_rotation_gets_it_when_it_comes_back_in_the_grace_period(rotated):
    a, e = rotated["nodes"]["a"], rotated["nodes"]["e"]
    new = parse_token(rotated["out"]["token"])
    _until(lambda: (e.home / "token").exists() and parse_token((e.home / "token").read_text()) == new,
           "e to receive the new token", timeout=GRACE)
    assert "mesh token rotated by" in e.log_tail(10**5)


def test_after_the_grace_period_only_holders_of_the_new_token_stay(rotated):
    nodes, out = rotated["nodes"], rotated["out"]
    a, b, e, f = nodes["a"], nodes["b"], nodes["e"], nodes["f"]
    # f (a fresh identity: node revocation cannot know it) got in with the old token
    # during the grace period, but was never handed the new one
    assert not (f.home / "token").exists()
    _until(lambda: "no longer accepted" in a.log_tail(10**5), "the grace period to end",
           timeout=GRACE + 30)
    assert f"closed {_peer_id(a, 'f')[-8:]}" in a.log_tail(10**5)
    _until(lambda: "f" not in _alive(a) and "f" not in _alive(b) and "f" not in _alive(e),
           "every node to drop f")
    # not just silent: its connections are closed (no stream of f's is served any more)
    _until(lambda: not any(_connected(n, "f") for n in (a, b, e)), "every node to close f's connections")
    _until(lambda: not any(r["connected"] for r in httpx.get(f.api + "/mesh/nodes", timeout=5).json()["data"]
                           if not r["self"]), "f to lose every connection")
    _until(lambda: _alive(a) >= {"b", "e"} and _alive(b) >= {"a", "e"}, "a, b and e to stay together")
    # f keeps dialing with the old token and stays out; a says why
    _until(lambda: "holds a different mesh token" in a.log_tail(10**5), "a to refuse f's old token")
    for _ in range(10):
        assert "f" not in _alive(a) and _alive(f) <= {"f"}
        time.sleep(0.3)


def test_a_new_machine_with_the_old_token_cannot_join_after_the_rotation(rotated):
    a = rotated["nodes"]["a"]
    _until(lambda: time.time() > rotated["out"]["retire_at"] + 1, "the grace period to end",
           timeout=GRACE + 30)
    g = _node(rotated["tmp"], "g", rotated["old"], *rotated["peer"]).start()
    rotated["nodes"]["g"] = g
    g.wait_ready()
    _until(lambda: "holds a different mesh token" in g.log_tail(10**5), "g to be refused")
    assert "g" not in _alive(a) and _alive(g) <= {"g"}
    # the new token works for a new machine
    h = _node(rotated["tmp"], "h", rotated["out"]["token"], *rotated["peer"]).start()
    rotated["nodes"]["h"] = h
    h.wait_ready()
    _until(lambda: "h" in _alive(a) and "a" in _alive(h), "h to join with the new token")


def test_a_node_restarted_with_its_old_token_uses_the_new_one(rotated):
    nodes = rotated["nodes"]
    a, b = nodes["a"], nodes["b"]
    _until(lambda: time.time() > rotated["out"]["retire_at"] + 1, "the grace period to end",
           timeout=GRACE + 30)
    b.stop()
    nodes["b"] = b = _node(rotated["tmp"], "b", rotated["old"], *rotated["peer"]).start()
    b.wait_ready()
    assert any("was rotated" in line for line in b.lines), b.lines
    _until(lambda: "b" in _alive(a) and "a" in _alive(b), "b to rejoin")
    assert _status(b)["mesh"] == rotated["out"]["mesh"]


def test_bad_rotation_requests_get_clear_errors(rotated, tmp_path):
    a = rotated["nodes"]["a"]
    for grace in (-1, 0, 10**9):
        r = httpx.post(a.api + "/mesh/token/rotate", json={"grace_s": grace}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "grace_s", r.text
    r = httpx.post(a.api + "/mesh/token/rotate", json={"grace": 30}, timeout=30)
    assert r.status_code == 400 and "grace" in r.json()["error"]["message"], r.text
    cli = run_cli("token", "rotate", "--grace", "0", "--url", a.api)
    assert cli.returncode != 0 and "grace_s must be between" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr
    alone = MeshNode(tmp_path / "alone", ["--name", "alone", "--no-models"]).start().wait_ready()
    try:
        cli = run_cli("token", "rotate", "--url", alone.api)
        assert cli.returncode != 0 and "not part of a mesh" in cli.stderr, cli.stderr
    finally:
        alone.stop()


def _connected(node, name: str) -> bool:
    return any(n["connected"] for n in httpx.get(node.api + "/mesh/nodes", timeout=5).json()["data"]
               if n["name"] == name)


def _peer_id(node, name: str) -> str:
    return next(n["peer_id"] for n in httpx.get(node.api + "/mesh/nodes", timeout=5).json()["data"]
                if n["name"] == name)
