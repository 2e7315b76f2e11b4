"""Prefix-affine routing on two `mesh up` processes: a conversation's next turn, sent to
any node, goes to the node whose slots hold its history, and yields to load."""

from __future__ import annotations


import httpx
import openai
import pytest

from tests.procs import MeshNode, hogging, run_cli
from tests.test_mesh import eventually

CHAT = "smollm2-135m-instruct"
SYSTEM = ("You are a careful assistant for a team that runs machines on a local network. "
          "Answer in one short sentence, plainly, without lists. ") * 4


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    token = run_cli("token").stdout.strip()
    tmp = tmp_path_factory.mktemp("affinity")
    a = MeshNode(tmp / "a", ["--name", "a", "--token", token, "--no-mdns", "--model", CHAT]).start()
    addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    b = MeshNode(tmp / "b", ["--name", "b", "--token", token, "--no-mdns", "--model", CHAT,
                             "--peer", addr]).start()
    a.wait_ready()
    b.wait_ready()
    for x, y in ((a, "b"), (b, "a")):
        assert eventually(lambda: any(m["state"] == "loaded" for m in _entry(x, y)["models"]),
                          timeout=60), f"{y} not seen serving"
    yield {"a": a, "b": b}
    a.stop()
    b.stop()


def _entry(node, name):
    nodes = httpx.get(node.api + "/mesh/status", timeout=5).json()["nodes"]
    return next(n for n in nodes if n["name"] == name)


def _model(node, name):
    return next(m for m in _entry(node, name)["models"] if m["id"] == CHAT)


def _ask(node, messages):
    c = openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=120)
    raw = c.chat.completions.with_raw_response.create(
        model=CHAT, messages=messages, max_tokens=12, temperature=0, seed=1)
    return raw.headers, raw.parse()


def _first_turn(node, topic):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {topic}?"}]
    headers, r = _ask(node, msgs)
    assert headers["x-mesh-node"] == node.args[node.args.index("--name") + 1]   # local, free slot
    return msgs + [{"role": "assistant", "content": r.choices[0].message.content}], r


def test_the_second_turn_goes_where_the_first_was_served(mesh) -> None:
    a, b = mesh["a"], mesh["b"]
    before = _model(b, "a")["prefixes"]
    history, first = _first_turn(a, "a mesh network")
    # b hears of what a's slots now hold (a's next gossip message)
    assert eventually(lambda: _model(b, "a")["prefixes"] > before, timeout=15)
    headers, second = _ask(b, history + [{"role": "user", "content": "And a node?"}])
    assert headers["x-mesh-node"] == "a", headers
    assert headers["x-mesh-route"].startswith("prefix"), headers
    cached = second.usage.prompt_tokens_details.cached_tokens
    # a kept the whole first turn (its prompt and its reply, less the last token)
    assert cached >= first.usage.prompt_tokens, (cached, first.usage)
    routes = httpx.get(b.api + "/mesh/status", timeout=5).json()["self"]["routes"]
    assert routes.get("prefix", 0) >= 1, routes


def test_affinity_yields_to_load(mesh) -> None:
    a, b = mesh["a"], mesh["b"]
    history, _ = _first_turn(a, "a router")
    assert eventually(lambda: _model(b, "a")["prefixes"] > 0, timeout=15)
    client = openai.OpenAI(base_url=a.v1, api_key="unused", max_retries=0, timeout=120)
    slots = _model(a, "a")["slots"]
    with hogging(client, CHAT, slots):                  # a's every slot is generating
        assert eventually(lambda: _model(b, "a")["busy"] >= slots, timeout=15)
        headers, second = _ask(b, history + [{"role": "user", "content": "Why?"}])
        assert headers["x-mesh-node"] == "b", headers   # no wait behind a's hogs
        assert headers["x-mesh-route"] == "local", headers
