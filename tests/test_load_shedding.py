"""A generation that cannot start within the node's queue_timeout gets a 503 with
Retry-After, in the dialect's error shape, instead of waiting without bound."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import MeshNode, hogging, run_cli
from tests.test_mesh import eventually

CHAT = "smollm2-135m-instruct"


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
    with hogging(client, CHAT, _slots(node)):       # every slot is generating
        r = httpx.post(node.v1 + "/chat/completions", timeout=60, json={
            "model": CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"].isdigit()
        err = r.json()["error"]
        assert err["code"] == "queue_timeout" and "1.5 s" in err["message"]
        r = httpx.post(node.api + "/api/chat", timeout=60, json={   # Ollama's shape too
            "model": CHAT, "stream": False, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "1.5 s" in r.json()["error"]
    # with the slots free again, the same request is served
    r = client.chat.completions.create(model=CHAT, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None


def test_a_queued_request_shows_as_deferred_with_its_expected_wait(tmp_path) -> None:
    """While every slot is taken, /metrics and `mesh status` show the queue and the wait a
    new request faces; when the slots free up, the queued request is served."""
    node = MeshNode(tmp_path / "home", ["--model", CHAT, "--no-mdns", "--name", "q"]).start().wait_ready()
    try:
        client = openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=120)
        for _ in range(2):            # requests that ended: the slot hold time is known
            client.chat.completions.create(model=CHAT, max_tokens=8,
                                           messages=[{"role": "user", "content": "hi"}])

        def gauges() -> dict[str, float]:
            text = httpx.get(node.api + "/metrics", timeout=10).text
            return {s.name: s.value for f in text_string_to_metric_families(text)
                    for s in f.samples if s.labels.get("model") == CHAT}

        assert eventually(lambda: gauges().get("mesh_expected_wait_seconds") == 0.0)
        queued: list = []
        late = threading.Thread(target=lambda: queued.append(client.chat.completions.create(
            model=CHAT, max_tokens=4, messages=[{"role": "user", "content": "hi"}])))
        with hogging(client, CHAT, _slots(node)):
            late.start()
            def waiting():
                g = gauges()
                return g.get("mesh_requests_deferred", 0) >= 1 and g.get("mesh_expected_wait_seconds", 0) > 0

            assert eventually(waiting), gauges()
            me = httpx.get(node.api + "/mesh/status", timeout=5).json()["nodes"][0]
            m = next(m for m in me["models"] if m["id"] == CHAT)
            assert m["queued"] >= 1 and m["wait_s"] > 0, m
            # (shown from half a second up: the wait grows with the age of the running ones)
            def shown():
                r = run_cli("status", "--url", node.api)
                return r.returncode == 0 and "wait~" in r.stdout

            assert eventually(shown), run_cli("status", "--url", node.api).stdout
        late.join(timeout=120)
        assert queued and queued[0].choices[0].message.content is not None   # served, late
        assert eventually(lambda: gauges().get("mesh_expected_wait_seconds") == 0.0)
    finally:
        node.stop()
