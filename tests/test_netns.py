"""Three hosts in network namespaces (../shared/tools/netmesh.sh) that join by mDNS alone,
then a cable cut and heal. Needs root and `ip netns`; skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.procs import MESH, REPO, MeshNode, run_cli
from tests.test_mesh import eventually

NETMESH = REPO.parent / "shared" / "tools" / "netmesh.sh"
PREFIX = f"imt{os.getpid() % 10000}"
CHAT = "smollm2-135m-instruct"
pytestmark = pytest.mark.netns


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not NETMESH.exists():
        return f"{NETMESH} is not here"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = subprocess.run(["ip", "netns", "add", f"{PREFIX}-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"{PREFIX}-probe"], capture_output=True)
    return None


def netmesh(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(NETMESH), *args], capture_output=True, text=True,
                          env={**os.environ, "NETMESH_PREFIX": PREFIX}, timeout=60)


def ip_of(i: int) -> str:
    return f"198.18.0.{10 + i}"


def in_ns(i: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-h{i}", *MESH, *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def names(i: int) -> set[str]:
    r = in_ns(i, "status", "--json", "--url", f"http://{ip_of(i)}:8080")
    if r.returncode != 0:
        return set()
    return {n["name"] for n in json.loads(r.stdout)["nodes"] if n["state"] == "alive"}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    why = _why_not()
    if why:
        pytest.skip(why)
    up = netmesh("up", "3")
    assert up.returncode == 0, up.stderr
    token = run_cli("token").stdout.strip()
    tmp = tmp_path_factory.mktemp("netns")
    nodes = []
    try:
        for i in (1, 2, 3):
            extra = ["--model", CHAT] if i == 1 else ["--no-models"]
            n = MeshNode(tmp / f"h{i}", ["--name", f"h{i}", "--host", ip_of(i), "--port", "8080",
                                         "--p2p-port", "4001", *extra],
                         env={"MESH_TOKEN": token}, prefix=["ip", "netns", "exec", f"{PREFIX}-h{i}"])
            nodes.append(n.start())
        for n in nodes:
            n.wait_ready()
        yield nodes
    finally:
        for n in nodes:
            try:
                n.stop()
            except AssertionError:
                pass
        netmesh("down")


def test_hosts_join_by_mdns_alone(hosts):
    for i in (1, 2, 3):
        assert eventually(lambda: names(i) == {"h1", "h2", "h3"}, timeout=30), names(i)
    # A chat through h3, which has no model: h1 serves it across the "network".
    script = ("import httpx, json, sys; print(httpx.post(sys.argv[1], timeout=60, json="
              "json.loads(sys.argv[2])).text)")
    r = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-h3", sys.executable, "-c", script,
                        f"http://{ip_of(3)}:8080/v1/chat/completions",
                        json.dumps({"model": CHAT, "max_tokens": 5,
                                    "messages": [{"role": "user", "content": "Hi"}]})],
                       capture_output=True, text=True, timeout=90)
    body = json.loads(r.stdout)
    assert body["choices"][0]["message"]["content"], body


def test_cut_and_heal(hosts):
    assert eventually(lambda: names(2) == {"h1", "h2", "h3"}, timeout=30)
    assert netmesh("cut", "1").returncode == 0
    try:
        assert eventually(lambda: "h1" not in names(2) and "h1" not in names(3), timeout=8)
    finally:
        assert netmesh("heal", "1").returncode == 0
    assert eventually(lambda: names(2) == {"h1", "h2", "h3"} == names(1), timeout=45)
