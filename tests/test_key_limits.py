"""Keys that cannot lock a mesh open by accident, an open mesh that says so, and the
per-key concurrency cap held by the node that serves, not only the one a client talks to."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"


def _key(node, name, features, admin=None):
    r = run_cli("keys", "create", "--name", name, "--features", features, "--url", node.api,
                *(["--key", admin] if admin else []))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1].split()[-1]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keylimits")
    token = run_cli("token").stdout.strip()
    b = MeshNode(tmp / "b", ["--name", "b", "--model", CHAT, "--no-mdns", "--token", token],
                 env={"MESH_MAX_CONCURRENT_PER_KEY": "1"}).start()
    addr = b.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    b.wait_ready()
    a = MeshNode(tmp / "a", ["--name", "a", "--no-models", "--no-mdns", "--token", token,
                             "--peer", addr], env={"MESH_MAX_CONCURRENT_PER_KEY": "0"}).start()
    a.wait_ready()
    yield a, b
    a.stop()
    b.stop()


def test_an_open_mesh_says_so_on_every_response(mesh) -> None:
    a, _ = mesh
    for path in ("/v1/models", "/health", "/nope"):
        assert "no API key" in httpx.get(a.api + path).headers["x-mesh-open"]


def test_the_serving_node_holds_the_per_key_cap_and_the_last_key_needs_force(mesh) -> None:
    a, b = mesh
    admin = _key(a, "owner", "admin")
    assert "x-mesh-open" not in httpx.get(a.api + "/health").headers
    bot = _key(a, "bot", "chat,models", admin)
    deadline = time.monotonic() + 30            # the key reaches b by gossip
    while httpx.get(b.v1 + "/models", headers={"Authorization": f"Bearer {bot}"}).status_code != 200:
        assert time.monotonic() < deadline, "the key never reached node b"
        time.sleep(0.2)
    client = openai.OpenAI(base_url=a.v1, api_key=bot, max_retries=0, timeout=120)
    first_token = threading.Event()
    stop = threading.Event()

    def hold():
        with client.chat.completions.create(model=CHAT, stream=True, max_tokens=2000,
                                            messages=[{"role": "user", "content": "A long story."}]) as s:
            for _ in s:
                first_token.set()
                if stop.is_set():
                    return

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert first_token.wait(120)
        with pytest.raises(openai.RateLimitError) as ei:       # a's own cap is off: b refuses
            client.chat.completions.create(model=CHAT, max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
        assert ei.value.body["code"] == "concurrency_limit" and "serving node" in ei.value.body["message"]
        other = openai.OpenAI(base_url=a.v1, api_key=admin, max_retries=0, timeout=120)
        assert other.chat.completions.create(model=CHAT, max_tokens=2, messages=[
            {"role": "user", "content": "hi"}]).choices           # another key is served
    finally:
        stop.set()
        t.join(timeout=120)
    # revoking keys: the last live one only with --force
    assert run_cli("keys", "revoke", "bot", "--url", a.api, "--key", admin).returncode == 0
    r = run_cli("keys", "revoke", "owner", "--url", a.api, "--key", admin)
    assert r.returncode == 1 and "last live key" in r.stderr and "Traceback" not in r.stderr
    assert httpx.get(a.v1 + "/models").status_code == 401            # still locked
    r = run_cli("keys", "revoke", "owner", "--force", "--url", a.api, "--key", admin)
    assert r.returncode == 0, r.stderr
    assert httpx.get(a.v1 + "/models").status_code == 200
