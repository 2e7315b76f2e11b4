"""Security across the mesh: keys made on one node work on every node, revocation
spreads, features hold on proxied requests, plaintext and wrong-token peers are refused,
and no secret reaches any log."""

from __future__ import annotations

import json

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


def admin_headers(mesh) -> dict:
    """The first key made in this module is an admin key; none yet: the mesh is open."""
    return {"Authorization": f"Bearer {mesh['secrets'][0]}"} if mesh["secrets"] else {}


def status_code(node, key, path="/v1/models"):
    return httpx.get(node.api + path, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def enforcing(node) -> bool:
    """The node holds a live key: it refuses a request that carries none (while it has
    no key it is open, and answers any key, good or bad, with a 200)."""
    return httpx.get(node.v1 + "/models", timeout=10).status_code == 401


def test_keys_replicate_and_revocation_spreads(mesh):
    n1, n2, n3 = mesh["nodes"]
    admin = create(n1, "owner", "admin")
    mesh["secrets"].append(admin)
    # The key made on node 1 reaches nodes 2 and 3 within seconds: they stop being open,
    # then take that key and refuse another.
    for n in (n2, n3):
        assert eventually(lambda: enforcing(n), timeout=5), f"{n.home.name} is still open"
        assert status_code(n, admin) == 200
        assert status_code(n, "mk-0123456789abcdef-not-a-key") == 401
    bot = create(n1, "bot", "chat,models", key=admin)
    mesh["secrets"].append(bot)
    assert eventually(lambda: all(status_code(n, bot) == 200 for n in (n2, n3)), timeout=5)
    # Features hold on a proxied request: n3 has no model; n1 serves it.
    client = openai.OpenAI(base_url=n3.v1, api_key=bot, max_retries=0)
    r = client.chat.completions.with_raw_response.create(
        model=CHAT, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert r.headers["x-mesh-node"] == "n1" and r.parse().choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):      # refused at n3's door
        client.embeddings.create(model=CHAT, input="x")
    # Revocation on node 2 reaches node 1 within 3 s.
    r = run_cli("keys", "revoke", "bot", "--url", n2.api, "--key", admin)
    assert r.returncode == 0, r.stderr
    assert eventually(lambda: status_code(n1, bot) == 401, timeout=3, interval=0.05)
    listing = json.loads(run_cli("keys", "list", "--json", "--url", n3.api, "--key", admin).stdout)
    assert {k["name"]: k["revoked"] for k in listing} == {"owner": False, "bot": True}
    # Without a key, every node refuses now.
    for n in (n1, n2, n3):
        assert httpx.get(n.v1 + "/models").status_code == 401


def test_the_serving_peer_checks_the_features_itself(mesh):
    """A request that n3's door lets through, and that only n1's own check refuses.
    `/tokenize` needs the 'completions' feature at the door (api/auth.py), but counting a
    chat prompt (`messages`) needs 'chat' (mesh/wire/inference.py feature_of), which the
    serving node checks on a proxied request (`authorize`, node/daemon.py)."""
    n1, n2, n3 = mesh["nodes"]
    admin = create(n1, "owner2", "admin", key=mesh["secrets"][0] if mesh["secrets"] else None)
    mesh["secrets"].append(admin)
    counter = create(n1, "counter", "completions", key=admin)
    mesh["secrets"].append(counter)
    auth = {"Authorization": f"Bearer {counter}"}
    content = {"model": CHAT, "content": "Hello there"}
    # the key passes n3's door and n1 serves its request (n3 has no model)
    r = eventually(lambda: (x := httpx.post(n3.api + "/tokenize", json=content, headers=auth,
                                            timeout=30)).status_code == 200 and x, timeout=10)
    assert r and r.headers["x-mesh-node"] == "n1" and r.json()["tokens"], r
    chat = {"model": CHAT, "messages": [{"role": "user", "content": "Hello there"}]}
    r = httpx.post(n3.api + "/tokenize", json=chat, headers=auth, timeout=30)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["type"] == "permission_error" and "'chat'" in err["message"], err
    assert n3.log_tail(10**6).count("Traceback") == 0


def test_plaintext_and_wrong_token_peers_are_refused(mesh):
    """libp2p hosts that are not ours dial node 1. Each dial must fail as a dial that the
    node refused (py-libp2p's SwarmException): any other outcome, a connection, a hang
    past the deadline or another error, fails the test. A host with the right token and
    Noise, dialing the same way, does connect: the refusals come from the node."""
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.network.exceptions import SwarmException
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from multiaddr import Multiaddr

    from mesh.p2p.pnet import PnetTCP
    from mesh.token import parse_token

    n1 = mesh["nodes"][0]
    target = info_from_p2p_addr(Multiaddr(mesh["addr"]))

    async def attempt(psk, plaintext=True):
        kp = create_new_key_pair()
        kwargs = {"transports": [PnetTCP(psk, lambda addr: None)]} if psk else {}
        if plaintext:
            kwargs["sec_opt"] = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)}
        host = new_host(key_pair=kp, **kwargs)
        async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            # a node that does not speak pnet is dropped after the node's upgrade timeout
            # (5 s), and py-libp2p dials three times: 30 s covers it
            with trio.fail_after(30):
                try:
                    await host.connect(target)
                except SwarmException as exc:
                    return exc
                return "connected"

    def denied() -> int:
        return httpx.get(n1.api + "/mesh/status", timeout=10,
                         headers=admin_headers(mesh)).json()["self"]["denied"]

    right_psk = parse_token(mesh["token"]).keys.psk
    wrong_psk = parse_token(run_cli("token").stdout.strip()).keys.psk
    for label, psk in (("plaintext, no pnet", None), ("plaintext, right token", right_psk)):
        outcome = trio.run(attempt, psk)
        assert isinstance(outcome, SwarmException), f"{label}: {outcome!r}"
    before = denied()
    outcome = trio.run(attempt, wrong_psk)
    assert isinstance(outcome, SwarmException), f"plaintext, wrong token: {outcome!r}"
    assert denied() > before
    assert "holds a different mesh token" in n1.log_tail(10**6)
    # the control: the same dial with the right token and Noise gets a connection
    assert trio.run(attempt, right_psk, False) == "connected"
    for n in mesh["nodes"]:
        st = httpx.get(n.api + "/mesh/status", timeout=10, headers=admin_headers(mesh)).json()
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
