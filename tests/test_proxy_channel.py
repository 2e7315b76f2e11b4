"""Proxied events on the bulk side channel (mesh/proxy.py, "Side channel").

Two meshes of two `mesh up` processes on 127.0.0.1: in each, A serves SmolLM2 and B has
no models, so a request sent to B is proxied to A. The first A listens for side channels
(the default); the second runs with MESH_BULK_PORT=-1 (bulk_port: -1), so its events stay on the libp2p
stream. B logs at DEBUG (`--log-level DEBUG`) the path each proxied request's events
took; A's worker (MESH_LOG_LEVEL=DEBUG) logs its account of every request it ends
("request done (cancelled): ...").
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.procs import MeshNode, run_cli, until

CHAT = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
NO_EOS = {"0": -100, "2": -100}   # <|endoftext|>, <|im_end|>: such a stream runs to max_tokens


def pair(tmp, token: str, a_env: dict[str, str]) -> tuple[MeshNode, MeshNode]:
    a = MeshNode(tmp / "a", ["--name", "a", "--model", CHAT, "--no-mdns"],
                 env={"MESH_TOKEN": token, "MESH_LOG_LEVEL": "DEBUG", **a_env}).start()
    addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready()
    b = MeshNode(tmp / "b", ["--name", "b", "--no-models", "--no-mdns", "--peer", addr,
                             "--log-level", "DEBUG"], env={"MESH_TOKEN": token}).start().wait_ready()
    until(lambda: CHAT in {m["id"] for m in httpx.get(b.v1 + "/models", timeout=5).json()["data"]},
          "B to list A's model")
    return a, b


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    started = []
    try:
        for name, env in (("channel", {}), ("stream", {"MESH_BULK_PORT": "-1"})):
            token = run_cli("token").stdout.strip()
            a, b = pair(tmp_path_factory.mktemp(name), token, env)
            started += [a, b]
        yield {"channel": started[:2], "stream": started[2:]}
    finally:
        for n in started:
            n.stop()


def client(node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=120)


def streamed(node, **extra) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in client(node).chat.completions.create(
            model=CHAT, messages=MESSAGES, max_tokens=48, temperature=0, stream=True, **extra):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def paths(node) -> list[str]:
    return re.findall(r"proxy to a: events on (the side channel|the libp2p stream)",
                      node.log_tail(10**7))


@pytest.mark.parametrize("kind, path", [("channel", "the side channel"),
                                        ("stream", "the libp2p stream")])
def test_a_proxied_stream_is_the_same_on_either_path(meshes, kind, path):
    a, b = meshes[kind]
    before = len(paths(b))
    direct = streamed(a)
    assert direct[0] and direct[1] in ("stop", "length")
    assert streamed(b) == direct
    assert paths(b)[before:] == [path]
    # a plain (non-streamed) answer and its usage take the same path
    r = client(b).chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=48,
                                          temperature=0)
    assert r.choices[0].message.content == direct[0] and r.usage.completion_tokens > 0
    assert paths(b)[before:] == [path, path]


@pytest.mark.parametrize("kind", ["channel", "stream"])
def test_a_client_that_leaves_cancels_the_request_on_the_serving_node(meshes, kind):
    a, b = meshes[kind]
    def cancelled():
        return re.findall(r"request done \(cancelled\): .*", a.log_tail(10**7))
    before = len(cancelled())
    got = 0
    with client(b).chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=1500,
                                           temperature=0, logit_bias=NO_EOS, stream=True) as s:
        for chunk in s:
            got += bool(chunk.choices and chunk.choices[0].delta.content)
            if got >= 3:
                break               # leaving the `with` closes the connection to B
    line = until(lambda: cancelled()[before:], "A to cancel the abandoned request")[0]
    generated = int(re.search(r"(\d+) generated", line).group(1))
    assert generated < 1500, line
