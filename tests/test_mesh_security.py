"""Security across the mesh: keys made on one node work on every node, revocation
spreads, features hold on proxied requests, plaintext and wrong-token peers are refused,
and no secret reaches any log."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import trio

from tests.procs import MeshNode, run_cli
from tests.test_mesh import eventually, names

CHAT = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    token = run_cli("token").stdout.strip()
    tmp = tmp_path_factory.mktemp("secure")
    one = MeshNode(tmp / "1", ["--name", "n1", "--token", token, "--no-mdns",
                               "--model", CHAT]).start()
    addr = one.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    one.wait_ready()
    two = MeshNode(tmp / "2", ["--name", "n2", "--no-models", "--no-mdns", "--peer", addr],
                   env={"MESH_TOKEN": token}).start().wait_ready()
    three = MeshNode(tmp / "3", ["--name", "n3", "--no-models", "--no-mdns", "--peer", addr],
                     env={"MESH_TOKEN": token}).start().wait_ready()
    nodes = (one, two, three)
    for n in nodes:
        assert eventually(lambda: names(n) == {"n1", "n2", "n3"}), names(n)
    yield {"nodes": nodes, "token": token, "addr": addr, "secrets": []}
    for n in nodes:
        n.stop()


def create(node, name, features, key=None):
    r = run_cli("keys", "create", "--name", name, "--features", features, "--url", node.api,
                *(["--key", key] if key else []))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1].split()[-1]


def status_code(node, key, path="/v1/models"):
    return httpx.get(node.api + path, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def test_keys_replicate_and_revocation_spreads(mesh):
    n1, n2, n3 = mesh["nodes"]
    admin = create(n1, "owner", "admin")
    mesh["secrets"].append(admin)
    # A key made on node 1 works on node 3 within seconds.
    assert eventually(lambda: status_code(n3, admin) == 200, timeout=5)
    bot = create(n1, "bot", "chat,models", key=admin)
    mesh["secrets"].append(bot)
    assert eventually(lambda: all(status_code(n, bot) == 200 for n in (n2, n3)), timeout=5)
    # Features hold on a proxied request: n3 has no model; n1 serves it.
    client = openai.OpenAI(base_url=n3.v1, api_key=bot, max_retries=0)
    r = client.chat.completions.with_raw_response.create(
        model=CHAT, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert r.headers["x-mesh-node"] == "n1" and r.parse().choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model=CHAT, input="x")
    # Revocation on node 2 reaches node 1 within 3 s.
    r = run_cli("keys", "revoke", "bot", "--url", n2.api, "--key", admin)
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    assert eventually(lambda: status_code(n1, bot) == 401, timeout=3, interval=0.05)
    assert time.monotonic() - t0 < 3
    listing = json.loads(run_cli("keys", "list", "--json", "--url", n3.api, "--key", admin).stdout)
    assert {k["name"]: k["revoked"] for k in listing} == {"owner": False, "bot": True}
    # Without a key, every node refuses now.
    for n in (n1, n2, n3):
        assert httpx.get(n.v1 + "/models").status_code == 401


def test_plaintext_and_wrong_token_peers_are_refused(mesh):
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from multiaddr import Multiaddr

    from mesh.p2p.pnet import PnetTCP
    from mesh.token import parse_token

    results = {}

    async def attempt(label, psk):
        kp = create_new_key_pair()
        transports = [PnetTCP(psk, lambda addr: None)] if psk else None
        kwargs = {"transports": transports} if transports else {}
        host = new_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)}, **kwargs)
        async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                with trio.fail_after(10):
                    await host.connect(info_from_p2p_addr(Multiaddr(mesh["addr"])))
                    stream = await host.new_stream(info_from_p2p_addr(Multiaddr(mesh["addr"])).peer_id,
                                                   ["/mesh/openai/1"])
                    await stream.write(b"\x00\x00\x00\x01\x80")
                    results[label] = await stream.read(10)
            except BaseException as exc:   # refused: what we want
                results[label] = exc

    right_psk = parse_token(mesh["token"]).keys.psk
    wrong_psk = parse_token(run_cli("token").stdout.strip()).keys.psk
    for label, psk in (("plaintext, no pnet", None), ("plaintext, right token", right_psk),
                       ("plaintext, wrong token", wrong_psk)):
        t0 = time.monotonic()
        trio.run(attempt, label, psk)
        assert isinstance(results[label], BaseException), f"{label}: got {results[label]!r}"
        assert time.monotonic() - t0 < 12
    for n in mesh["nodes"]:
        st = httpx.get(n.api + "/mesh/status", timeout=10,
                       headers={"Authorization": f"Bearer {mesh['secrets'][0]}"}).json()
        assert {x["name"] for x in st["nodes"]} == {"n1", "n2", "n3"}


def test_no_secret_in_any_log(mesh):
    assert mesh["secrets"], "runs after the key test"
    secret_token = mesh["token"]
    for n in mesh["nodes"]:
        text = n.log_tail(10**8) + "\n".join(n.lines)
        assert secret_token not in text
        for s in mesh["secrets"]:
            assert s not in text and s.split("-", 2)[2] not in text
        st = httpx.get(n.api + "/mesh/status", timeout=10,
                       headers={"Authorization": f"Bearer {mesh['secrets'][0]}"}).text
        assert secret_token not in st and "hash" not in st and "salt" not in st
