"""The request deadline (`MESH_REQUEST_TIMEOUT`) bounds whole requests, locally and
proxied, streamed and not, and its expiry is an error the client reads.

D serves SmolLM2 with a 2 s deadline; E is an entry point with no model and the same
deadline, in one mesh with D.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"     # SmolLM2 keeps counting far past 2 s
DEADLINE = 2.0
LONG = {"model": CHAT, "prompt": COUNTING, "max_tokens": 1500, "temperature": 0}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    token = run_cli("token").stdout.strip()
    tmp = tmp_path_factory.mktemp("deadline")
    env = {"MESH_REQUEST_TIMEOUT": str(DEADLINE)}
    d = MeshNode(tmp / "d", ["--name", "d", "--model", CHAT, "--token", token, "--no-mdns"],
                 env=env).start()
    addr = d.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    d.wait_ready()
    e = MeshNode(tmp / "e", ["--name", "e", "--no-models", "--token", token, "--no-mdns",
                             "--peer", addr], env=env).start().wait_ready()
    client = openai.OpenAI(base_url=e.v1, api_key="unused", max_retries=0, timeout=30)
    end = time.monotonic() + 30
    while CHAT not in {m.id for m in client.models.list()}:
        assert time.monotonic() < end, "e never saw d's model"
        time.sleep(0.2)
    yield {"local": d, "proxied": e}
    d.stop(), e.stop()


@pytest.mark.parametrize("where", ["local", "proxied"])
def test_a_stream_past_its_deadline_ends_with_a_readable_error(nodes, where) -> None:
    node = nodes[where]
    t0 = time.monotonic()
    with httpx.stream("POST", node.v1 + "/completions", json={**LONG, "stream": True},
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["x-mesh-node"] == "d"
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    took = time.monotonic() - t0
    assert data[-1] == "[DONE]"
    texts = [json.loads(x)["choices"][0]["text"] for x in data[:-2]]
    assert "".join(texts).strip(), "tokens arrived before the deadline"
    err = json.loads(data[-2])["error"]
    assert err["code"] == "deadline_exceeded" and err["type"] == "server_error"
    assert "deadline" in err["message"]
    assert DEADLINE - 0.2 < took < DEADLINE + 3


@pytest.mark.parametrize("where", ["local", "proxied"])
def test_a_request_past_its_deadline_is_a_504(nodes, where) -> None:
    client = openai.OpenAI(base_url=nodes[where].v1, api_key="unused", max_retries=0,
                           timeout=30)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as ei:
        client.completions.create(**LONG)
    took = time.monotonic() - t0
    assert ei.value.status_code == 504
    assert ei.value.body["code"] == "deadline_exceeded" and "deadline" in ei.value.body["message"]
    assert DEADLINE - 0.2 < took < DEADLINE + 3
    # a short request on the same node still works
    ok = client.completions.create(model=CHAT, prompt="Hello", max_tokens=3)
    assert ok.choices[0].text
