"""A generation that cannot start within the node's queue_timeout gets a 503 with
Retry-After, in the dialect's error shape, instead of waiting without bound."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.procs import MeshNode

CHAT = "smollm2-135m-instruct"
NO_END = {"0": -100, "2": -100}     # SmolLM2's <|endoftext|> and <|im_end|>


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = MeshNode(tmp_path_factory.mktemp("shed") / "home",
                 ["--model", CHAT, "--no-mdns", "--name", "shed"],
                 env={"MESH_QUEUE_TIMEOUT": "1.5"}).start().wait_ready()
    yield n
    n.stop()


def _slots(node) -> int:
    me = httpx.get(node.api + "/mesh/status", timeout=5).json()["nodes"][0]
    return next(m["slots"] for m in me["models"] if m["id"] == CHAT)


def test_a_request_with_no_slot_in_time_gets_a_503_with_retry_after(node) -> None:
    client = openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=120)
    slots = _slots(node)
    started = threading.Barrier(slots + 1)
    stop = threading.Event()

    def hog():
        with client.chat.completions.create(
                model=CHAT, stream=True, max_tokens=3000, temperature=1.0,
                logit_bias=NO_END,      # the story cannot end early and free its slot
                messages=[{"role": "user", "content": "Tell a very long story."}]) as s:
            for i, _ in enumerate(s):
                if i == 1:
                    started.wait()
                if stop.is_set():
                    return

    hogs = [threading.Thread(target=hog) for _ in range(slots)]
    for t in hogs:
        t.start()
    try:
        started.wait(timeout=120)           # every slot is generating
        r = httpx.post(node.v1 + "/chat/completions", timeout=60, json={
            "model": CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"].isdigit()
        err = r.json()["error"]
        assert err["code"] == "queue_timeout" and "1.5 s" in err["message"]
        r = httpx.post(node.api + "/api/chat", timeout=60, json={   # Ollama's shape too
            "model": CHAT, "stream": False, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "1.5 s" in r.json()["error"]
    finally:
        stop.set()
        for t in hogs:
            t.join(timeout=120)
    # with the slots free again, the same request is served
    r = client.chat.completions.create(model=CHAT, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None
