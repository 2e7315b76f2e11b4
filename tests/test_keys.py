"""API keys on one node: open until a key exists, then 401/403 by feature, revocation,
persistence across restart, and no secret in any log; the limits (429 per client address
after failed attempts, the per-key concurrency cap) on a second node of their own."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

import httpx
import openai
import pytest

from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"


def keys_cli(node, *args, key=None):
    extra = ["--key", key] if key else []
    return run_cli("keys", *args, "--url", node.api, *extra)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = MeshNode(tmp_path_factory.mktemp("keys") / "home",
                 ["--model", CHAT, "--no-mdns", "--name", "keys-node"]).start().wait_ready()
    yield n
    n.stop()


def last_word(out: str) -> str:
    return out.strip().splitlines()[-1].split()[-1]


def test_keys_lifecycle(node):
    # Open while there is no key.
    assert httpx.get(node.v1 + "/models").status_code == 200
    # The first key must be an admin key: nobody can lock themselves out by mistake.
    r = keys_cli(node, "create", "--name", "bot", "--features", "chat")
    assert r.returncode == 1 and "admin" in r.stderr and "Traceback" not in r.stderr
    r = keys_cli(node, "create", "--name", "owner", "--features", "admin")
    assert r.returncode == 0, r.stderr
    admin = last_word(r.stdout)
    assert admin.startswith("mk-")
    # From now on the node requires keys.
    r = httpx.get(node.v1 + "/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=node.v1, api_key="mk-0000-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = keys_cli(node, "create", "--name", "bot", "--features", "chat,embeddings")
    assert r.returncode == 1 and "401" in r.stderr          # management needs the admin key
    r = keys_cli(node, "create", "--name", "bot", "--features", "chat,embeddings", key=admin)
    assert r.returncode == 0, r.stderr
    bot = last_word(r.stdout)
    client = openai.OpenAI(base_url=node.v1, api_key=bot, max_retries=0)
    out = client.chat.completions.create(model=CHAT, max_tokens=4,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert out.choices[0].message.content
    assert client.embeddings.create(model=CHAT, input="x").data
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.completions.create(model=CHAT, prompt="x", max_tokens=2)
    assert "completions" in str(e.value)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.list()
    r = httpx.get(node.api + "/mesh/status", headers={"Authorization": f"Bearer {bot}"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.get(node.api + "/health").status_code == 200
    # Listing never shows secrets.
    r = keys_cli(node, "list", "--json", key=admin)
    listing = json.loads(r.stdout)
    assert {k["name"] for k in listing} == {"owner", "bot"}
    assert bot not in r.stdout and admin not in r.stdout and "hash" not in r.stdout
    assert next(k for k in listing if k["name"] == "bot")["last_used"] is not None
    # The last admin key cannot be revoked while other keys live.
    r = keys_cli(node, "revoke", "owner", key=admin)
    assert r.returncode == 1 and "admin" in r.stderr
    assert keys_cli(node, "revoke", "bot", key=admin).returncode == 0
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=CHAT, max_tokens=2,
                                       messages=[{"role": "user", "content": "Hi"}])
    # Restart: keys and revocations survive.
    node.stop()
    node.start().wait_ready()
    client = openai.OpenAI(base_url=node.v1, api_key=bot, max_retries=0)   # a new port
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model=CHAT, input="x")
    assert openai.OpenAI(base_url=node.v1, api_key=admin, max_retries=0).models.list().data
    # Secrets never reach the log.
    log = node.log_tail(10**7)
    assert admin not in log and bot not in log
    assert admin.split("-", 2)[2] not in (node.home / "keys.json").read_text()


# ------------------------------------------------------------------- limits
CAP = 2                            # MESH_MAX_CONCURRENT_PER_KEY of the `limits` node
FAILS = 10                         # "429 after 10 failed attempts per client address in 60 s"
NO_EOS = {"0": -100, "2": -100}    # <|endoftext|>, <|im_end|>: such a stream runs to max_tokens


@pytest.fixture(scope="module")
def limits(tmp_path_factory):
    n = MeshNode(tmp_path_factory.mktemp("keys-limits") / "home",
                 ["--model", CHAT, "--no-mdns", "--name", "limits"],
                 env={"MESH_MAX_CONCURRENT_PER_KEY": str(CAP)}).start().wait_ready()
    try:
        admin = last_word(keys_cli(n, "create", "--name", "owner", "--features", "admin").stdout)
        keys = {"admin": admin}
        for name in ("alice", "bob"):
            r = keys_cli(n, "create", "--name", name, "--features", "chat", key=admin)
            assert r.returncode == 0, r.stderr
            keys[name] = last_word(r.stdout)
        yield n, keys
    finally:
        n.stop()


def from_address(ip: str) -> httpx.Client:
    """An HTTP client whose connections come from `ip` (any 127.x.y.z is this machine)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=ip), timeout=30)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_failed_attempts_are_rate_limited_per_client_address(limits):
    node, keys = limits
    url = node.v1 + "/models"
    with from_address("127.0.0.2") as guesser, from_address("127.0.0.3") as neighbour:
        codes = [guesser.get(url, headers=bearer(f"mk-0000000000000000-guess{i}")).status_code
                 for i in range(FAILS)]
        assert codes == [401] * FAILS
        # that address is now refused, even with a good key
        r = guesser.get(url, headers=bearer(keys["admin"]))
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # another address is not: its good key is served, its bad key is a plain 401
        assert neighbour.get(url, headers=bearer(keys["admin"])).status_code == 200
        assert neighbour.get(url, headers=bearer("mk-0000000000000000-x")).status_code == 401


def test_concurrent_requests_per_key_are_capped(limits):
    node, keys = limits
    url = node.v1 + "/chat/completions"
    long = {"model": CHAT, "max_tokens": 1500, "temperature": 0, "logit_bias": NO_EOS,
            "stream": True, "messages": [{"role": "user", "content": "Tell a long story."}]}
    short = {"model": CHAT, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    with ExitStack() as streams:
        # alice's CAP streams, each running (a first token in); their line iterators are
        # kept: dropping one would close its response (httpx closes it on GeneratorExit)
        lines = []
        for _ in range(CAP):
            r = streams.enter_context(httpx.stream("POST", url, json=long, timeout=60,
                                                   headers=bearer(keys["alice"])))
            assert r.status_code == 200
            lines.append(r.iter_lines())
            assert next(line for line in lines[-1] if line.startswith("data: "))
        # the next request of that key is refused while they run ...
        r = httpx.post(url, json=short, headers=bearer(keys["alice"]), timeout=60)
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "concurrency_limit" and "alice" in err["message"], err
        # ... and another key is served meanwhile
        r = httpx.post(url, json=short, headers=bearer(keys["bob"]), timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    # the streams are closed: alice's next request is served (once the node has seen
    # them end)
    deadline = time.monotonic() + 30
    while (r := httpx.post(url, json=short, headers=bearer(keys["alice"]),
                           timeout=60)).status_code == 429:
        assert time.monotonic() < deadline, "the closed streams still count against the key"
        time.sleep(0.1)
    assert r.status_code == 200, r.text
