"""A frozen peer (SIGSTOP) never hangs a client: three `mesh up` processes on 127.0.0.1.

A is an entry point with no model; B and C both serve SmolLM2. Clients talk to A only.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"     # SmolLM2 keeps counting: a long stream


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    token = run_cli("token").stdout.strip()
    tmp = tmp_path_factory.mktemp("liveness")
    a = MeshNode(tmp / "a", ["--name", "a", "--no-models", "--token", token, "--no-mdns"]).start()
    addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready()
    b = MeshNode(tmp / "b", ["--name", "b", "--model", CHAT, "--token", token, "--no-mdns",
                             "--peer", addr]).start()
    c = MeshNode(tmp / "c", ["--name", "c", "--model", CHAT, "--token", token, "--no-mdns",
                             "--peer", addr]).start()
    b.wait_ready(), c.wait_ready()
    nodes = {"a": a, "b": b, "c": c}
    # A sees both serving peers alive (its own status, which its router reads)
    deadline = time.monotonic() + 30
    while not _serving(a) >= {"b", "c"}:
        assert time.monotonic() < deadline, f"A never saw b and c: {_serving(a)}"
        time.sleep(0.2)
    yield nodes
    for n in nodes.values():
        os.kill(n.proc.pid, signal.SIGCONT)
        n.stop()


def _serving(node) -> set[str]:
    st = httpx.get(node.api + "/mesh/status", timeout=5).json()
    return {n["name"] for n in st["nodes"] if n["state"] == "alive"
            and any(m["id"] == CHAT and m["state"] == "loaded" for m in n["models"])}


def _sse(lines):
    for line in lines:
        if line.startswith("data: "):
            yield line[6:]


def test_a_peer_frozen_mid_stream_ends_the_stream_with_an_error(mesh) -> None:
    a = mesh["a"]
    body = {"model": CHAT, "prompt": COUNTING, "max_tokens": 1500, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", a.v1 + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        name = r.headers["x-mesh-node"]
        serving = mesh[name]
        events = _sse(r.iter_lines())
        texts = [json.loads(next(events))["choices"][0]["text"] for _ in range(5)]
        assert "".join(texts).strip()
        os.kill(serving.proc.pid, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            tail = list(events)
            took = time.monotonic() - frozen_at
        finally:
            os.kill(serving.proc.pid, signal.SIGCONT)
    assert tail[-1] == "[DONE]"
    err = json.loads(tail[-2])["error"]
    assert err["code"] == "peer_silent" and err["type"] == "server_error"
    assert f"'{name}'" in err["message"]
    assert took < 5, f"the error came {took:.1f} s after the freeze"


def test_a_request_whose_best_peer_is_frozen_is_served_by_another(mesh) -> None:
    a = mesh["a"]
    # both serving peers idle, each with a gossiped decode speed: A ranks the faster first,
    # by the router's rule "equal wait: the faster peer" (which one is faster is the
    # machine's noise, so the test freezes whichever A ranks first)
    for name in ("b", "c"):
        r = httpx.post(mesh[name].v1 + "/completions", json={
            "model": CHAT, "prompt": COUNTING, "max_tokens": 40, "temperature": 0}, timeout=60)
        assert r.status_code == 200
    deadline = time.monotonic() + 10
    while not (_tps(a, "b") > 0 and _tps(a, "c") > 0 and _tps(a, "b") != _tps(a, "c")
               and _idle(a, "b") and _idle(a, "c")):
        assert time.monotonic() < deadline, "b's and c's decode speeds never reached A's view"
        time.sleep(0.1)
    first, other = ("b", "c") if _tps(a, "b") > _tps(a, "c") else ("c", "b")
    frozen = mesh[first]
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        took = []
        for _ in range(2):
            t0 = time.monotonic()
            r = httpx.post(a.v1 + "/chat/completions", timeout=30, json={
                "model": CHAT, "max_tokens": 5, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hi"}]})
            took.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            assert r.headers["x-mesh-node"] == other
            assert r.json()["choices"][0]["message"]["content"]
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    assert f"{first} could not start the request" in a.log_tail(20000)   # it was tried first
    assert took[0] < 3, f"served by {other} {took[0]:.1f} s after the request"
    assert took[1] < took[0], f"the frozen peer was tried again: {took}"


def _idle(node, name: str) -> bool:
    st = httpx.get(node.api + "/mesh/status", timeout=5).json()
    return any(n["name"] == name and all(m["busy"] == 0 and m["queued"] == 0
                                         for m in n["models"]) for n in st["nodes"])


def _tps(node, name: str) -> float:
    st = httpx.get(node.api + "/mesh/status", timeout=5).json()
    for n in st["nodes"]:
        if n["name"] == name and n["state"] == "alive":
            return max([m.get("tokens_per_s") or 0.0 for m in n["models"]] or [0.0])
    return -1.0
