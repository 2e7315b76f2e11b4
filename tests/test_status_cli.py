"""`mesh status` (compact at 80 columns, --wide, --json, --watch), `mesh chat`, `mesh
gallery` without a node, `mesh doctor`, and the metrics (`/metrics`, `/mesh/metrics`) on
a two-node mesh: `a` serves SmolLM2, `b` (a long name) serves nothing and lends memory."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gallery.catalog import load_index
from mesh.errors import NoCapacity
from mesh.router import PeerCandidate, Router
from mesh.wire.inference import Delta, Done, Generate, Message, Usage
from node.metrics import NodeMetrics
from tests.procs import MESH, REPO, MeshNode, run_cli

CHAT = "smollm2-135m-instruct"
LONG = "b-with-a-rather-long-node-name"


def until(fn, timeout=30.0, interval=0.2):
    """fn() until truthy (state another node has to catch up with); its last value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except httpx.HTTPError:
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    token = run_cli("token").stdout.strip()
    a = MeshNode(tmp / "a", ["--name", "a", "--token", token, "--no-mdns", "--model", CHAT]).start()
    b = None
    try:
        addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
        a.wait_ready()
        b = MeshNode(tmp / "b", ["--name", LONG, "--token", token, "--no-mdns", "--no-models",
                                 "--offer-memory", "64MiB", "--peer", addr]).start().wait_ready()

        def both_see_each_other():
            return all({n["name"] for n in httpx.get(x.api + "/mesh/status").json()["nodes"]
                        if n["state"] == "alive" and (n["name"] == LONG or n["models"])} == {"a", LONG}
                       for x in (a, b))
        assert until(both_see_each_other)
        yield {"a": a, "b": b, "token": token, "addr": addr, "tmp": tmp}
    finally:
        for n in (b, a):
            if n is not None:
                n.stop()


def status_json(node) -> dict:
    return httpx.get(node.api + "/mesh/status", timeout=10).json()


def no_traceback(r) -> None:
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr


# ------------------------------------------------------------------ mesh status
@pytest.mark.parametrize("columns", [80, 60])
def test_compact_status_fits_the_terminal_and_hides_nothing(mesh, columns):
    r = run_cli("status", "--url", mesh["b"].api, env={"COLUMNS": str(columns)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    too_long = [ln for ln in lines if len(ln) > columns]
    assert not too_long, "\n".join(too_long)
    st = status_json(mesh["b"])
    a = next(n for n in st["nodes"] if n["name"] == "a")
    b = st["nodes"][0]
    # full node names, short ids, each model as id×slots busy/queued
    assert any(ln.startswith("● a ") for ln in lines) and any(ln.startswith(f"● {LONG} ") for ln in lines)
    assert "…" + a["id"][-8:] in r.stdout and a["id"] not in r.stdout
    assert re.search(rf"{re.escape(CHAT)}×\d+ \d+/\d+", r.stdout), r.stdout
    # items are never split across lines: each one is whole on some line
    for item in (r"RAM [\d.]+/[\d.]+G free", r"load \d+\.\d\d", r"rtt [\d.]+ms", r"seen \d+s",
                 r"lends [\d.]+/[\d.]+G free", r"\d+ nodes, \d+ alive"):
        assert re.search(item, r.stdout), (item, r.stdout)
    assert "a [loaded]" in r.stdout and "no models" in r.stdout
    assert b["api"].split("://")[1] in r.stdout and "this node" in r.stdout
    assert "lends" in r.stdout                      # b lends memory to split models


def test_wide_status_shows_every_field_in_full(mesh):
    r = run_cli("status", "--wide", "--url", mesh["b"].api, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    for n in status_json(mesh["b"])["nodes"]:
        assert n["id"] in r.stdout and n["api"] in r.stdout and n["name"] in r.stdout
        assert all(addr in r.stdout for addr in n["addrs"])
    assert "a [loaded]" in r.stdout


def test_json_status_is_the_nodes_document(mesh):
    r = run_cli("status", "--json", "--url", mesh["b"].api)
    assert r.returncode == 0, r.stderr
    got, want = json.loads(r.stdout), status_json(mesh["b"])
    assert set(got) == set(want) == {"self", "mesh", "nodes", "warnings"}
    assert [(n["id"], n["name"]) for n in got["nodes"]] == [(n["id"], n["name"]) for n in want["nodes"]]
    bad = run_cli("status", "--json", "--watch", "--url", mesh["b"].api)
    assert bad.returncode == 2 and "--watch" in bad.stderr
    no_traceback(bad)


def test_watch_redraws_in_place_until_ctrl_c(mesh):
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    p = subprocess.Popen([*MESH, "status", "--watch", "--url", mesh["b"].api], cwd=REPO,
                         stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    try:
        while out.count(b"asked ") < 3 and time.monotonic() < deadline and p.poll() is None:
            if select.select([master], [], [], 1)[0]:
                out += os.read(master, 65536)
        assert out.count(b"asked ") >= 3, out[-2000:]          # three frames
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 0
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    assert b"\x1b[1A" in out and b"\x1b[2K" in out      # the cursor goes back up: redrawn in place
    assert b"Traceback" not in out and b"Aborted" not in out


# ------------------------------------------------------------------ mesh chat
def test_chat_streams_answers_and_names_the_serving_node(mesh):
    r = run_cli("chat", CHAT, "--url", mesh["b"].api, "--max-tokens", "8", "--temperature", "0",
                input="Say hello.\n/system Answer in one word.\nAnd again?\n/exit\n", timeout=240)
    assert r.returncode == 0, r.stderr
    served = re.findall(r"\[served by (\S+) · (\d+) tokens", r.stdout)
    assert served == [("a", served[0][1]), ("a", served[1][1])] and int(served[0][1]) > 0
    assert "(system prompt: Answer in one word.)" in r.stderr
    answers = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("[served")]
    assert len(answers) == 2
    no_traceback(r)


def test_chat_picks_a_model_and_refuses_an_unknown_one_in_one_line(mesh):
    r = run_cli("chat", "--url", mesh["b"].api, "--max-tokens", "4", input="Hi\n", timeout=240)
    assert r.returncode == 0 and f"chatting with {CHAT}" in r.stderr and "[served by a" in r.stdout
    bad = run_cli("chat", "no-such-model", "--url", mesh["b"].api, input="Hi\n")
    assert bad.returncode == 1 and "does not exist" in bad.stderr
    no_traceback(bad)
    gone = run_cli("chat", "--url", f"http://127.0.0.1:{free_port()}", input="Hi\n")
    assert gone.returncode == 1 and "cannot reach the node" in gone.stderr
    no_traceback(gone)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ mesh gallery
def test_gallery_without_a_node_lists_the_built_in_index_and_says_so():
    url = f"http://127.0.0.1:{free_port()}"
    r = run_cli("gallery", "--json", "--url", url)
    assert r.returncode == 0, r.stderr
    assert {e["id"] for e in json.loads(r.stdout)} == set(load_index())
    assert f"no node at {url}" in r.stderr and "built-in index" in r.stderr
    table = run_cli("gallery", "--url", url, env={"COLUMNS": "200"})
    assert table.returncode == 0 and CHAT in table.stdout and "built-in index" in table.stderr


# ------------------------------------------------------------------ mesh doctor
def doctor(*args, node=None, home=None):
    """`mesh doctor`, one line per finding (a wide terminal), no token but what it is given."""
    home = home or (node.home.parent / "doctor-home")
    return run_cli("doctor", "--mdns-wait", "1", *(["--url", node.api] if node else []), *args,
                   env={"MESH_TOKEN": "", "MESH_HOME": str(home), "COLUMNS": "400"}, timeout=60)


def test_doctor_on_a_healthy_mesh(mesh):
    r = doctor("--token", mesh["token"], node=mesh["b"])
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"^ok +token .*the node's mesh", out, re.M), out
    assert re.search(r"^ok +p2p port +a: 127\.0\.0\.1:\d+ takes connections", out, re.M), out
    assert re.search(rf"^ok +p2p port +{LONG}: ", out, re.M), out
    assert re.search(r"^warn +mdns +no mDNS answer", out, re.M)       # both run --no-mdns
    assert re.search(r"^ok +clock ", out, re.M) and re.search(r"^ok +memory +a: ", out, re.M)
    # the lender's RPC server sits in a network namespace of its own (node/isolation.py)
    assert re.search(rf"^ok +rpc isolation +RPC servers: {LONG}: netns$", out, re.M), out
    assert out.count("fix: ") == 1                                  # mdns only
    data = json.loads(doctor("--json", "--token", mesh["token"], node=mesh["b"]).stdout)
    assert data["failed"] == 0 and data["mesh"] == status_json(mesh["b"])["mesh"]
    assert {c["check"] for c in data["checks"]} == {"node", "token", "p2p port", "mdns", "clock",
                                                    "memory", "rpc isolation"}


def test_doctor_finds_a_token_mismatch_and_says_how_to_fix_it(mesh):
    other = run_cli("token").stdout.strip()
    r = doctor("--token", other, node=mesh["a"])
    assert r.returncode == 1
    line = next(ln for ln in r.stdout.splitlines() if "token mismatch" in ln)
    assert line.startswith("FAIL") and "use the same token on every node" in r.stdout
    damaged = doctor("--token", mesh["token"][:-3], node=mesh["a"])
    assert damaged.returncode == 1 and "is not valid" in damaged.stdout
    no_traceback(damaged)


def test_doctor_reports_connections_refused_for_another_token(mesh):
    before = status_json(mesh["a"])["self"]["denied"]
    x = MeshNode(mesh["tmp"] / "x", ["--name", "x", "--token", run_cli("token").stdout.strip(),
                                     "--no-mdns", "--no-models", "--peer", mesh["addr"]]).start()
    try:
        x.wait_ready()
        assert until(lambda: status_json(mesh["a"])["self"]["denied"] > before)
    finally:
        x.stop()
    r = doctor(node=mesh["a"])
    assert r.returncode == 1
    assert re.search(r"^FAIL +token +the node refused \d+ connections? made with another token", r.stdout, re.M)
    assert "give that machine this mesh's token" in r.stdout


def test_doctor_without_a_node_says_so_in_one_line(tmp_path):
    r = doctor("--url", f"http://127.0.0.1:{free_port()}", home=tmp_path)
    assert r.returncode == 1 and re.search(r"^FAIL +node +cannot reach the node", r.stdout, re.M)
    assert "fix: start it with `mesh up`" in r.stdout
    no_traceback(r)


# ------------------------------------------------------------------ metrics
def scrape(node, path="/metrics") -> dict[tuple[str, tuple], float]:
    text = httpx.get(node.api + path, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples, name, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_use_llama_server_names_per_model_and_count_the_mesh(mesh):
    a, b = mesh["a"], mesh["b"]
    before_a, before_b = scrape(a), scrape(b)
    r = httpx.post(b.v1 + "/chat/completions", timeout=240, json={
        "model": CHAT, "max_tokens": 6, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.headers["x-mesh-node"] == "a"
    usage = r.json()["usage"]
    after_a, after_b = scrape(a), scrape(b)
    # llama-server's names, per model, on the node that served it
    for name in ("mesh_requests_processing", "mesh_requests_deferred", "mesh_predicted_tokens_seconds"):
        assert value(after_a, name, model=CHAT) is not None, name
    grew = lambda s0, s1, name, **lb: (value(s1, name, **lb) or 0) - (value(s0, name, **lb) or 0)  # noqa: E731
    assert grew(before_a, after_a, "mesh_prompt_tokens_total", model=CHAT) == usage["prompt_tokens"]
    assert grew(before_a, after_a, "mesh_tokens_predicted_total", model=CHAT) == usage["completion_tokens"]
    # the mesh's own: b proxied it to a, a served it for b
    assert grew(before_b, after_b, "mesh_proxied_requests_total", peer="a") == 1
    assert grew(before_b, after_b, "mesh_proxied_failures_total", peer="a") == 0
    assert grew(before_a, after_a, "mesh_proxy_served_total", peer=LONG) == 1
    assert value(after_b, "mesh_router_retries_total") == value(before_b, "mesh_router_retries_total")
    assert value(after_b, "mesh_peers", state="alive") == 1
    assert 0 <= value(after_b, "mesh_gossip_age_seconds", peer="a") < 30


def test_mesh_metrics_cover_every_node_from_gossip(mesh):
    text = httpx.get(mesh["b"].api + "/mesh/metrics", timeout=10).text
    assert "# HELP mesh_model_slots" in text and "from gossiped node state" in text
    s = scrape(mesh["b"], "/mesh/metrics")
    for node in ("a", LONG):
        assert value(s, "mesh_node_alive", node=node) == 1
        assert value(s, "mesh_node_ram_total_bytes", node=node) > 0
    assert value(s, "mesh_model_loaded", node="a", model=CHAT) == 1
    assert value(s, "mesh_model_slots", node="a", model=CHAT) >= 1
    assert value(s, "mesh_node_rpc_offered_bytes", node=LONG) == 64 * 2**20
    assert value(s, "mesh_node_gossip_age_seconds", node=LONG) == 0      # b answered itself
    assert not any(k[0] == "mesh_model_loaded" and ("node", LONG) in k[1] for k in s)


# ------------------------------------------------------------------ retries (fakes)
REQ = Generate(model="m", messages=(Message(role="user", content="hi"),))


def _cand(pid: str, busy: int = 0) -> PeerCandidate:
    return PeerCandidate(peer_id=pid, name=pid, model="m", slots=1, busy=busy, queued=0,
                         tokens_per_s=0.0, rtt_ms=1.0)


async def _events(items):
    for ev in items:
        yield ev


@dataclass
class _Peers:
    cands: list[PeerCandidate]

    def candidates(self, model):
        return list(self.cands)

    def model_cards(self):
        return [{"id": "m"}]


@dataclass
class _Transport:
    refuse: set[str]
    opened: list[str] = field(default_factory=list)

    @asynccontextmanager
    async def open(self, p, request, *, caller, deadline):
        self.opened.append(p.peer_id)
        if p.peer_id in self.refuse:
            raise NoCapacity(f"{p.peer_id} is full")
        yield _events([Delta(text="x"), Done(usage=Usage(prompt_tokens=3, completion_tokens=1))])


class _NoLocal:
    def find(self, model):
        return None

    def model_cards(self):
        return []


def test_router_retries_and_failed_starts_are_counted_once_each():
    metrics = NodeMetrics(SimpleNamespace(workers={}))
    transport = _Transport(refuse={"full"})
    router = Router(local=metrics.local(_NoLocal()),
                    peers=_Peers([_cand("full"), _cand("free", busy=1)]),
                    transport=metrics.transport(transport))

    async def main():
        for _ in range(2):
            call = await router.open(REQ)
            assert call.served_by == "free"
            async for _ in call.events():
                pass
            await call.aclose()

    trio.run(main)
    assert transport.opened == ["full", "free", "full", "free"]
    reg = metrics.registry
    assert reg.get_sample_value("mesh_router_retries_total") == 2
    assert reg.get_sample_value("mesh_proxied_requests_total", {"peer": "full"}) == 2
    assert reg.get_sample_value("mesh_proxied_failures_total", {"peer": "full"}) == 2
    assert reg.get_sample_value("mesh_proxied_failures_total", {"peer": "free"}) is None

    # a request nobody can start is not a retry for the next one
    alone = Router(local=metrics.local(_NoLocal()), peers=_Peers([_cand("full")]),
                   transport=metrics.transport(_Transport(refuse={"full"})))

    async def refused():
        with pytest.raises(NoCapacity):
            await alone.open(REQ)
        call = await router.open(REQ.model_copy(update={"max_tokens": 5}))
        await call.aclose()

    trio.run(refused)
    assert reg.get_sample_value("mesh_router_retries_total") == 3     # only the "full" -> "free" move
