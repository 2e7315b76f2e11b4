"""API keys on one node: open until a key exists, then 401/403 by feature, revocation,
persistence across restart, and no secret in any log."""

from __future__ import annotations

import json

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


def test_failed_attempts_are_rate_limited(node):
    codes = [httpx.get(node.v1 + "/models", headers={"Authorization": f"Bearer mk-x-{i}"}).status_code
             for i in range(14)]
    assert 401 in codes and codes[-1] == 429
