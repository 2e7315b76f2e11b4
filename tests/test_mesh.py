"""Three `mesh up` processes on 127.0.0.1 sharing one token; only node A has models.

A logs at DEBUG, so its worker's own account of each request it ends ("request done
(cancelled): ... N generated") is in A's log.
"""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import openai
import pytest

from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"


def eventually(fn, timeout=15.0, interval=0.1):
    """fn() until it returns a truthy value; its last value (or the failure) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except (httpx.HTTPError, AssertionError):
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def status(node) -> dict:
    r = run_cli("status", "--json", "--url", node.api)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def names(node) -> set[str]:
    return {n["name"] for n in httpx.get(node.api + "/mesh/status", timeout=5).json()["nodes"]
            if n["state"] == "alive"}


@pytest.fixture(scope="module")
def token():
    r = run_cli("token")
    assert r.returncode == 0
    return r.stdout.strip()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, token):
    tmp = tmp_path_factory.mktemp("mesh")
    with socket.socket() as s:          # a fixed p2p port, so A can restart on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = MeshNode(tmp / "a", ["--name", "a", "--token", token, "--no-mdns",
                             "--p2p-port", str(port)], env={"MESH_LOG_LEVEL": "DEBUG"}).start()
    a_addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready()
    # b names a by DNS and without its peer id, as compose-cluster.yml does
    b_peer = a_addr.replace("/ip4/127.0.0.1/", "/dns4/localhost/").split("/p2p/")[0]
    b = MeshNode(tmp / "b", ["--name", "b", "--no-models", "--token", token, "--no-mdns",
                             "--peer", b_peer]).start().wait_ready()
    c = MeshNode(tmp / "c", ["--name", "c", "--no-models", "--no-mdns", "--peer", a_addr],
                 env={"MESH_TOKEN": token}).start().wait_ready()
    nodes = {"a": a, "b": b, "c": c, "a_addr": a_addr, "tmp": tmp, "token": token}
    yield nodes
    for n in ("a", "b", "c"):      # a test may have replaced a node by its restarted self
        nodes[n].stop()


def test_all_nodes_see_each_other(mesh):
    for n in ("a", "b", "c"):
        assert eventually(lambda: names(mesh[n]) == {"a", "b", "c"}), names(mesh[n])
    st = status(mesh["c"])
    assert st["self"]["name"] == "c" and st["self"]["addrs"]
    a = next(n for n in st["nodes"] if n["name"] == "a")
    assert {m["id"] for m in a["models"]} == {CHAT, "whisper-tiny.en"}
    assert a["memory"]["ram_total"] > 0 and a["state"] == "alive" and a["id"].startswith("12D3")
    assert all(n["models"] == [] for n in st["nodes"] if n["name"] != "a")
    table = run_cli("status", "--url", mesh["c"].api)
    assert table.returncode == 0 and CHAT in table.stdout and "a [loaded]" in table.stdout


def test_models_list_is_mesh_wide(mesh):
    client = openai.OpenAI(base_url=mesh["b"].v1, api_key="x", max_retries=0)
    assert eventually(lambda: {CHAT, "whisper-tiny.en"} <= {m.id for m in client.models.list().data})


def test_streamed_chat_through_a_node_without_the_model(mesh):
    eventually(lambda: CHAT in {m["id"] for m in httpx.get(mesh["c"].v1 + "/models").json()["data"]})
    client = openai.OpenAI(base_url=mesh["c"].v1, api_key="x", max_retries=0)
    t0 = time.monotonic()
    arrivals = []
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, stream=True, max_tokens=60,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    assert raw.headers["x-mesh-node"] == "a"
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 20
    assert arrivals[0] < 0.5 * arrivals[-1], "chunks came all at once, not as a stream"
    r = client.chat.completions.create(model="smollm2", max_tokens=5,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content


def test_embeddings_and_transcription_proxy(mesh, speech_wav):
    client = openai.OpenAI(base_url=mesh["b"].v1, api_key="x", max_retries=0)
    assert len(client.embeddings.create(model=CHAT, input="hello").data[0].embedding) == 576
    with open(speech_wav, "rb") as f:
        text = client.audio.transcriptions.create(model="whisper-1", file=f).text
    assert "hello" in text.lower()
    r = httpx.post(mesh["b"].v1 + "/chat/completions", json={"model": CHAT, "messages": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_constraints_travel_with_a_proxied_request(mesh):
    """json_schema, a forced tool call and logprobs through b, served by a."""
    client = openai.OpenAI(base_url=mesh["b"].v1, api_key="unused", max_retries=0, timeout=120)
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer"}},
              "required": ["colour", "count"], "additionalProperties": False}
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "Pick a colour and a number."}],
        max_tokens=60, temperature=0, logprobs=True, top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert raw.headers["x-mesh-node"] == "a"
    r = raw.parse()
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"colour", "count"} and obj["colour"] in ("red", "green", "blue")
    assert "".join(t.token for t in r.choices[0].logprobs.content) == r.choices[0].message.content
    tool = {"type": "function", "function": {"name": "paint", "parameters": schema}}
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Paint something."}], tools=[tool],
        tool_choice="required", max_tokens=80, temperature=0, parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "paint" and set(json.loads(call.function.arguments)) == {"colour", "count"}


NO_EOS = {"0": -100, "2": -100}   # <|endoftext|>, <|im_end|>: such a stream runs to max_tokens


def cancelled_lines(node) -> list[str]:
    """The worker's log lines of requests it ended because they were cancelled."""
    return re.findall(r"request done \(cancelled\): .*", node.log_tail(10**8))


def test_disconnect_through_the_proxy_cancels_on_the_peer(mesh):
    a = mesh["a"]
    before = len(cancelled_lines(a))
    client = openai.OpenAI(base_url=mesh["c"].v1, api_key="x", max_retries=0)
    with client.chat.completions.create(model=CHAT, stream=True, max_tokens=1900,
                                        temperature=0, logit_bias=NO_EOS, messages=[
            {"role": "user", "content": "Write a very long story."}]) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
    # A's worker ends the request because it was cancelled (left alone it would end
    # after 1900 tokens, as "length"), then its slot is free
    deadline = time.monotonic() + 120
    while len(cancelled_lines(a)) == before:
        assert time.monotonic() < deadline, "A's worker never ended the closed stream"
        time.sleep(0.1)
    (line,) = cancelled_lines(a)[before:]
    assert int(re.search(r"(\d+) generated", line).group(1)) < 1900, line

    def idle():
        me = httpx.get(a.api + "/mesh/status").json()["nodes"][0]
        return all(m["in_flight"] == 0 and not m.get("busy") for m in me["models"])
    assert eventually(idle, timeout=30)


def test_wrong_token_is_refused(mesh, tmp_path):
    other = run_cli("token").stdout.strip()
    # d holds another token; e, started beside it the same way, holds the right one: what
    # e sees once it joined is what d would see, had the mesh admitted it
    d = MeshNode(tmp_path / "d", ["--name", "d", "--no-models", "--token", other, "--no-mdns",
                                  "--peer", mesh["a_addr"]]).start()
    e = MeshNode(tmp_path / "e", ["--name", "e", "--no-models", "--token", mesh["token"],
                                  "--no-mdns", "--peer", mesh["a_addr"]]).start()
    try:
        d.wait_ready(), e.wait_ready()
        assert eventually(lambda: status(mesh["a"])["self"]["denied"] > 0, timeout=10)
        ok = {"model": CHAT, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}

        def chat_on_e():
            r = httpx.post(e.v1 + "/chat/completions", json=ok, timeout=60)
            return r if r.status_code == 200 else None
        served = eventually(chat_on_e, timeout=30)
        assert served is not None, "e, holding the right token, never got a's model"
        assert served.headers["x-mesh-node"] == "a"
        assert eventually(lambda: "e" in names(mesh["a"]), timeout=10)
        # by now d, had it been admitted, would see a and its model as e does
        for n in ("a", "b", "c"):
            assert "d" not in {x["name"] for x in status(mesh[n])["nodes"]}
        assert {x["name"] for x in status(d)["nodes"]} == {"d"}
        r = httpx.post(d.v1 + "/chat/completions", timeout=30, json=ok)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "different mesh token" in mesh["a"].log_tail(10**6)
        assert "Traceback" not in d.log_tail(10**6)
    finally:
        d.stop(), e.stop()


def test_killed_serving_node_leaves_and_comes_back_with_same_id(mesh):
    a, c = mesh["a"], mesh["c"]
    a_id = status(a)["self"]["id"]
    a.stop(sig=9)

    def a_out_of_routing(n):
        return all(x["state"] != "alive" for x in status(mesh[n])["nodes"] if x["name"] == "a")
    for n in ("b", "c"):
        assert eventually(lambda: a_out_of_routing(n), timeout=15), status(mesh[n])["nodes"]
    client = openai.OpenAI(base_url=c.v1, api_key="x", max_retries=0, timeout=20)
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    assert ei.value.body["code"] == "model_not_found"
    # a new MeshNode on the same home: the killed process's stdout reader may still see
    # its pipe close (its worker holds the pipe a moment longer)
    a = mesh["a"] = MeshNode(a.home, a.args, env=a.env).start()
    a.wait_for(r"mesh: p2p ")
    a.wait_ready()
    assert status(a)["self"]["id"] == a_id
    assert eventually(lambda: "a" in names(c), timeout=30)

    def chat_on_c():
        try:
            return client.chat.completions.with_raw_response.create(
                model=CHAT, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        except openai.NotFoundError:     # c has not had a's model back yet
            return None
    r = eventually(chat_on_c, timeout=30)
    assert r is not None and r.headers["x-mesh-node"] == "a", "c never routed to a again"
    assert r.parse().choices[0].message.content
