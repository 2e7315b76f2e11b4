"""Claims of docs/architecture.md about the proxy hop that no other test checked, on real
`mesh up` processes: a peer that fails before its first event is replaced by the next
candidate; a peer killed mid-stream ends the client's stream with an error event; the
caller's API key never travels to the serving peer; the serving peer checks the caller.

The mesh: A (an entry point with no model) and B (serves SmolLM2), real processes with API
keys from the start, plus F, a test double of a mesh node: it runs in this process (its
own trio thread), joins with the mesh token through the product's p2p layer
(mesh/p2p: pnet, Noise, the admission handshake, gossip), gossips that it serves SmolLM2
faster than anyone (64 free slots, 10^6 tokens/s, so A's router ranks it first), and
answers `/mesh/openai/2` as each test tells it: failing before its first event, or
serving a canned reply, keeping the raw bytes of every request that reached it. F can
also act as an origin and send B a request of its own making.

The output layer kept on the loading node (split models) is not tested here: it needs
tests/test_split.py's lending nodes, and that file has another owner.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import trio

from mesh.p2p import open_p2p
from mesh.proxy import PROTOCOL
from mesh.token import parse_token
from mesh.wire.framing import FrameReader, pack, unpack
from mesh.wire.inference import (Delta, Done, Failed, Generate, Heartbeat, Message, Usage,
                                 decode_event, encode_event, encode_request)
from mesh.wire.state import ModelState, NodeState
from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
NO_EOS = {"0": -100, "2": -100}       # <|endoftext|>, <|im_end|>: the stream cannot end early
REPLY = "a reply made by the fake peer"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def until(fn, what: str, timeout: float = 30.0, interval: float = 0.1):
    """fn() until it returns a truthy value (polling an API with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s (last: {value!r})"
        time.sleep(interval)


# ------------------------------------------------------------------ the fake peer
class FakePeer:
    """A mesh node written for the test (see the module note). `mode`:
    hidden (gossips no model), failed (a heartbeat, then Failed(WorkerDied): the peer's
    worker died before the first token), reset (a heartbeat, then a reset stream),
    serve (a heartbeat, one Delta of REPLY, Done)."""

    def __init__(self, home: Path, token: str, bootstrap: str) -> None:
        self.home, self.token, self.bootstrap = home, parse_token(token), bootstrap
        self.mode = "hidden"
        self.received: list[tuple[bytes, dict]] = []   # (raw request frame, decoded)
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-peer")

    def state(self) -> NodeState:
        models = [] if self.mode == "hidden" else [ModelState(
            id=CHAT, backend="llama", state="loaded", ctx=2048, slots=64,
            tokens_per_s=1e6, capabilities=["chat", "completions"])]
        return NodeState(name="fake", version="test", models=models, ts=time.time())

    # -- thread
    def start(self) -> "FakePeer":
        self._thread.start()
        assert self._up.wait(60), f"the fake peer did not start: {self._error!r}"
        return self

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:   # reported by start() and stop(); nothing is swallowed
            self._error = exc
            self._up.set()

    async def _main(self) -> None:
        async with open_p2p(home=self.home, token=self.token, name="fake",
                            listen_host="127.0.0.1", p2p_port=0, peers=[self.bootstrap],
                            mdns=False, state=self.state) as p2p:
            self.p2p = p2p
            self._trio = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            p2p.set_handler(PROTOCOL, self._handle)
            self._up.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._thread.is_alive() and self._error is None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._trio)
            self._thread.join(30)
        assert self._error is None, f"the fake peer failed: {self._error!r}"

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        trio.from_thread.run_sync(self.p2p.notify_changed, trio_token=self._trio)

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id

    def requests(self) -> list[tuple[bytes, dict]]:
        with self._lock:
            return list(self.received)

    # -- serving side
    async def _handle(self, stream, peer_id: str) -> None:
        header = await stream.read_exactly(4)
        body = await stream.read_exactly(int.from_bytes(header, "big"))
        with self._lock:
            self.received.append((header + body, unpack(body)))
        mode = self.mode

        async def send(ev) -> None:
            await stream.write(pack({"event": encode_event(ev)}))

        await send(Heartbeat())
        if mode == "failed":
            await send(Failed(error="WorkerDied", message="the fake peer's worker died",
                              code="worker_died"))
        elif mode == "reset":
            await stream.reset()
        elif mode == "serve":
            await send(Delta(text=REPLY))
            await send(Done(finish_reason="stop",
                            usage=Usage(prompt_tokens=5, completion_tokens=6, total_tokens=11)))
        else:
            raise AssertionError(f"a request reached the fake peer in mode {mode!r}")

    # -- origin side
    def ask(self, peer_id: str, head: dict) -> list:
        """Send `head` to `peer_id` over /mesh/openai/2; the events it answers, heartbeats
        left out, up to the terminal one."""

        async def go() -> list:
            with trio.fail_after(60):
                stream = await self.p2p.open_stream(peer_id, PROTOCOL)
                try:
                    await stream.write(pack(head))
                    reader, out = FrameReader(stream), []
                    while True:
                        frame = await reader.read()
                        assert frame is not None, f"the stream ended after {out}"
                        ev = decode_event(frame["event"])
                        if isinstance(ev, Heartbeat):
                            continue
                        out.append(ev)
                        if isinstance(ev, (Done, Failed)):
                            return out
                finally:
                    await stream.close()

        return trio.from_thread.run(go, trio_token=self._trio)


# ---------------------------------------------------------------------- the mesh
def create_key(node, name: str, features: str, admin: str | None = None) -> str:
    r = run_cli("keys", "create", "--name", name, "--features", features, "--url", node.api,
                *(["--key", admin] if admin else []))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1].split()[-1]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    token = run_cli("token").stdout.strip()
    tmp = tmp_path_factory.mktemp("claims")
    a = MeshNode(tmp / "a", ["--name", "a", "--no-models", "--token", token, "--no-mdns"]).start()
    addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready()
    b = MeshNode(tmp / "b", ["--name", "b", "--model", CHAT, "--token", token, "--no-mdns",
                             "--peer", addr]).start().wait_ready()
    fake, m = None, {}
    try:
        admin = create_key(a, "owner", "admin")
        user = create_key(a, "user", "chat,completions", admin)
        m.update({"a": a, "b": b, "admin": admin, "user": user, "addr": addr})
        # B holds the key ring (it refuses a request without a key) and A routes to B
        until(lambda: httpx.get(b.v1 + "/models", timeout=10).status_code == 401,
              "the keys reached B")
        fake = m["fake"] = FakePeer(tmp / "fake", token, addr).start()
        until(lambda: serving(m, "b"), "A sees B serving SmolLM2")
        until(lambda: "fake" in alive(m), "A admitted the fake peer")
        yield m
    finally:
        if fake is not None:
            fake.stop()
        a.stop(), m["b"].stop() if "b" in m else b.stop()


def status(m) -> dict:
    r = httpx.get(m["a"].api + "/mesh/status", timeout=10,
                  headers={"Authorization": f"Bearer {m['admin']}"})
    assert r.status_code == 200, r.text
    return r.json()


def alive(m) -> dict[str, dict]:
    return {n["name"]: n for n in status(m)["nodes"] if n["state"] == "alive"}


def serving(m, name: str) -> bool:
    node = alive(m).get(name)
    return bool(node) and any(x["id"] == CHAT and x["state"] == "loaded" for x in node["models"])


def fake_mode(m, mode: str) -> None:
    """Put the fake peer in `mode` and wait until A's view shows what it gossips."""
    m["fake"].set_mode(mode)
    want = mode != "hidden"
    until(lambda: serving(m, "fake") == want and serving(m, "b"),
          f"A's view of the fake peer in mode {mode}")


def client(m, key: str, node: str = "a") -> openai.OpenAI:
    return openai.OpenAI(base_url=m[node].v1, api_key=key, max_retries=0, timeout=120)


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("how", ["failed", "reset"])
def test_a_peer_failing_before_its_first_event_hands_the_request_to_the_next(mesh, how):
    fake = mesh["fake"]
    fake_mode(mesh, "hidden")
    expected = client(mesh, mesh["user"], "b").chat.completions.create(
        model=CHAT, messages=QUESTION, max_tokens=12, temperature=0).choices[0].message.content
    fake_mode(mesh, how)
    before = len(fake.requests())
    # non-streamed, then streamed: both reach the fake peer first, then B serves them
    raw = client(mesh, mesh["user"]).chat.completions.with_raw_response.create(
        model=CHAT, messages=QUESTION, max_tokens=12, temperature=0)
    assert raw.headers["x-mesh-node"] == "b"
    assert raw.parse().choices[0].message.content == expected
    raw = client(mesh, mesh["user"]).chat.completions.with_raw_response.create(
        model=CHAT, messages=QUESTION, max_tokens=12, temperature=0, stream=True)
    assert raw.headers["x-mesh-node"] == "b"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == expected
    tried = fake.requests()[before:]
    assert len(tried) == 2, "the fake peer, ranked first, was not tried first"
    for _, head in tried:
        assert head["request"]["model"] == CHAT
        assert head["request"]["messages"][0]["content"] == QUESTION[0]["content"]
    assert "fake could not start the request" in mesh["a"].log_tail(10**6)


def test_the_api_key_never_travels_to_the_serving_peer(mesh):
    key = create_key(mesh["a"], "relay", "chat", mesh["admin"])
    key_id, secret = key.split("-", 2)[1:]
    fake = mesh["fake"]
    fake_mode(mesh, "serve")
    before = len(fake.requests())
    raw = client(mesh, key).chat.completions.with_raw_response.create(
        model=CHAT, messages=QUESTION, max_tokens=8)
    assert raw.headers["x-mesh-node"] == "fake"
    assert raw.parse().choices[0].message.content == REPLY
    ((frame, head),) = fake.requests()[before:]
    # what reached the peer: the caller's identity and features, never the key
    assert secret.encode() not in frame and key.encode() not in frame
    assert b"bearer" not in frame.lower() and b"authorization" not in frame.lower()
    assert head["caller"] == {"name": "relay", "key_id": key_id, "features": ["chat"]}
    # a real serving peer: B answers a request A relayed with that key, and its log
    # holds neither the key nor its secret
    fake_mode(mesh, "hidden")
    raw = client(mesh, key).chat.completions.with_raw_response.create(
        model=CHAT, messages=QUESTION, max_tokens=4)
    assert raw.headers["x-mesh-node"] == "b" and raw.parse().choices[0].message.content
    log = mesh["b"].log_tail(10**8) + "\n".join(mesh["b"].lines)
    assert secret not in log and key not in log


def _chat_head(caller) -> dict:
    req = Generate(model=CHAT, messages=(Message(role="user", content="Hi"),), max_tokens=4)
    return {"v": 2, "request": encode_request(req), "caller": caller, "deadline": 60.0}


def _b_id(mesh) -> str:
    return alive(mesh)["b"]["id"]


def test_the_serving_peer_refuses_a_forwarded_request_without_the_feature(mesh):
    fake = mesh["fake"]
    fake_mode(mesh, "hidden")
    # a forwarding node that sends no caller while the mesh has keys
    events = fake.ask(_b_id(mesh), _chat_head(None))
    assert isinstance(events[0], Failed) and events[0].error == "AuthError", events
    # a key whose features, in B's own key ring, do not hold the request's: refused,
    # whatever features the forwarding node claims for it
    embedder = create_key(mesh["a"], "embedder", "embeddings", mesh["admin"])
    until(lambda: httpx.get(mesh["b"].v1 + "/models", timeout=10,
                            headers={"Authorization": f"Bearer {embedder}"}).status_code == 403,
          "B knows the key (a 403 for a feature it lacks, not a 401)")
    events = fake.ask(_b_id(mesh), _chat_head({"name": "embedder", "key_id":
                                               embedder.split("-", 2)[1], "features": ["chat"]}))
    assert isinstance(events[0], Failed) and events[0].error == "PermissionDenied", events
    assert "chat" in events[0].message
    # the same request for a key that has the feature is served: the refusals above
    # were the checks
    user_id = mesh["user"].split("-", 2)[1]
    events = fake.ask(_b_id(mesh), _chat_head({"name": "user", "key_id": user_id,
                                               "features": ["chat"]}))
    assert isinstance(events[-1], Done) and "".join(
        e.text for e in events if isinstance(e, Delta)), events


def test_the_serving_peer_checks_the_caller_in_its_own_key_ring(mesh):
    fake = mesh["fake"]
    fake_mode(mesh, "hidden")
    gone = create_key(mesh["a"], "gone", "chat", mesh["admin"])
    r = run_cli("keys", "revoke", "gone", "--url", mesh["a"].api, "--key", mesh["admin"])
    assert r.returncode == 0, r.stderr
    until(lambda: httpx.get(mesh["b"].v1 + "/models", timeout=10,
                            headers={"Authorization": f"Bearer {gone}"}).status_code == 401,
          "B knows the key is revoked")
    for caller in ({"name": "ghost", "key_id": "00000000deadbeef", "features": ["admin"]},
                   {"name": "gone", "key_id": gone.split("-", 2)[1], "features": ["chat"]}):
        events = fake.ask(_b_id(mesh), _chat_head(caller))
        assert isinstance(events[0], Failed) and events[0].error in (
            "AuthError", "PermissionDenied"), f"B served the caller {caller}: {events}"


def test_a_peer_killed_mid_stream_ends_the_stream_with_an_error_event(mesh):
    a, b = mesh["a"], mesh["b"]
    fake_mode(mesh, "hidden")
    body = {"model": CHAT, "prompt": COUNTING, "max_tokens": 1500, "temperature": 0,
            "logit_bias": NO_EOS, "stream": True}
    try:
        with httpx.stream("POST", a.v1 + "/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {mesh['user']}"}) as r:
            assert r.status_code == 200 and r.headers["x-mesh-node"] == "b"
            data = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
            head = [json.loads(next(data))["choices"][0]["text"] for _ in range(5)]
            assert "".join(head).strip()
            b.stop(signal.SIGKILL)
            tail = list(data)        # a hang would end in httpx.ReadTimeout, failing the test
        assert tail and tail[-1] == "[DONE]", tail[-3:]
        assert len(tail) >= 2, tail
        err = json.loads(tail[-2]).get("error")
        assert err is not None, f"the stream ended without an error event: {tail[-3:]}"
        assert err["type"] == "server_error" and "'b'" in err["message"], err
        for chunk in tail[:-2]:
            assert "error" not in json.loads(chunk)
    finally:
        if b.proc.poll() is not None:   # a new MeshNode: the old one's stdout reader may
            # still see the killed process's pipe close (its worker holds it a moment)
            mesh["b"] = MeshNode(b.home, b.args).start().wait_ready()
