"""The gallery's "peers" source: a model file comes from a mesh peer over /mesh/files/1,
and from its origin when no peer has it or a peer's copy is wrong.

Two parts. The protocol in one process (two libp2p hosts on 127.0.0.1, test_p2p.py's
pattern): a real server, resume after a broken transfer, a stalled peer. Then real
`mesh up` processes: B installs a gallery entry whose origin cannot work, so the only
way it gets the bytes is from A over the mesh; then it loads and chats with it.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest
import trio
import yaml

from gallery import GalleryEntry, Store
from gallery.store import advertisement
from mesh.bulk import BulkServer
from mesh.files import PROTOCOL, MeshFileFetcher, candidates, make_handler
from mesh.token import new_token, parse_token
from mesh.wire.framing import pack, read_frame
from tests.procs import MeshNode, models_dir, run_cli
from tests.test_mesh import eventually
from tests.test_p2p import alive, node, run

GGUF = "smollm2-135m-instruct"
DEAD_ORIGIN = "http://127.0.0.1:9/nothing"        # the discard port: nothing answers


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_install(models: Path, model_id: str, name: str, content: bytes, *,
                  claims: bytes | None = None) -> str:
    """An installed model holding `content` under `name`, its manifest claiming the hash
    (and size) of `claims` (default: the content itself). Returns the claimed sha256."""
    claimed = content if claims is None else claims
    d = models / model_id
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(content)
    spec = {"uri": DEAD_ORIGIN, "sha256": _sha(claimed), "size": len(claimed), "path": name}
    entry = GalleryEntry.model_validate({"id": model_id, "name": model_id, "backend": "llama",
                                         "files": [spec]})
    Store(models).write_manifest(entry, list(entry.files))
    return _sha(claimed)


# --------------------------------------------------------------------------- in-process
@asynccontextmanager
async def serving(p2p, store: Store, *, side_channel: bool = True):
    """`p2p` serves `store`'s files, with a side channel (BulkServer) unless told not to."""
    async with trio.open_nursery() as nursery:
        server = None
        if side_channel:
            server = await nursery.start(BulkServer(host="127.0.0.1", peer_id=p2p.peer_id).serve)
        p2p.set_handler(PROTOCOL, make_handler(store.find_file_by_sha256, store.models_dir,
                                               bulk_server=server))
        yield server
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("side_channel", [True, False], ids=["side-channel", "libp2p"])
def test_fetch_from_a_peer_and_refusals(tmp_path: Path, side_channel: bool) -> None:
    token = parse_token(new_token())
    data = os.urandom(3 * 2**20 + 123)
    sha = _fake_install(tmp_path / "models", "blob", "blob.bin", data)
    store = Store(tmp_path / "models")
    assert advertisement(store) == {"files": [sha]}

    async def main() -> None:
        async with node(tmp_path, token, "a", extra=advertisement(store)) as a, \
                node(tmp_path, token, "b", [a.addrs[0]]) as b, \
                serving(a, store, side_channel=side_channel):
            assert await b.view.wait_for(alive(a), 8)
            assert [p.name for p in candidates(b.view, sha)] == ["a"]
            assert candidates(b.view, "0" * 64) == []          # a's list says it has not
            seen: list[int] = []
            fetcher = MeshFileFetcher(b, piece=2**20)
            assert await fetcher.fetch(sha, len(data), tmp_path / "got", seen.append)
            assert (tmp_path / "got").read_bytes() == data and fetcher.source == "peer:a"
            assert fetcher.verified == (sha, len(data))
            how = "side channel" if side_channel else "libp2p stream"
            assert fetcher.sources == [("a", len(data), how)]
            assert seen == sorted(seen) and seen[-1] == len(data)
            # the wrong size for this hash: refused before any byte is written
            assert not await fetcher.fetch(sha, len(data) + 1, tmp_path / "got2", seen.append)
            # the size unknown: the peer's answer gives it
            assert await fetcher.fetch(sha, None, tmp_path / "got3", seen.append)
            assert (tmp_path / "got3").read_bytes() == data

            # the wire itself: a resumed request, an unknown hash, a malformed request
            async def ask(req: dict) -> tuple[dict | None, bytes]:
                s = await b.open_stream(a.peer_id, PROTOCOL)
                await s.write(pack(req))
                await s.close()
                head = await read_frame(_Receiver(s))
                body = bytearray()
                while chunk := await s.read():
                    body += chunk
                return head, bytes(body)

            assert await ask({"v": 1, "sha256": sha, "offset": 3 * 2**20}) == (
                {"ok": True, "size": len(data)}, data[3 * 2**20:])
            assert await ask({"v": 1, "sha256": "f" * 64, "offset": 0}) == (
                {"ok": False, "error": "not_found"}, b"")
            assert await ask({"v": 1, "sha256": sha, "offset": len(data) + 1}) == (
                {"ok": False, "error": "bad_offset"}, b"")
            assert await ask({"v": 1, "sha256": "../../etc/passwd", "offset": 0}) == (None, b"")
            assert await ask({"v": 2, "sha256": sha}) == ({"ok": True, "size": len(data),
                                                          "bulk": None}, b"")

    run(main)


def test_two_peers_share_the_work_and_a_liar_is_dropped(tmp_path: Path, caplog) -> None:
    """a and c hold the file; b takes pieces from both (c is asked first and serves on
    libp2p streams only, so each takes some whatever the timing). Then c's copy is wrong
    in every piece: the joint copy fails, each is asked alone, a's copy is kept. Then
    both lie: each is dropped for this file and the fetch fails."""
    token = parse_token(new_token())
    data = os.urandom(16 * 2**20)
    sha = _fake_install(tmp_path / "a-models", "blob", "blob.bin", data)
    _fake_install(tmp_path / "c-models", "blob", "blob.bin", data)
    a_store, c_store = Store(tmp_path / "a-models"), Store(tmp_path / "c-models")
    caplog.set_level(logging.INFO, logger="mesh.files")

    async def main() -> None:
        async with node(tmp_path, token, "a", extra=advertisement(a_store)) as a, \
                node(tmp_path, token, "c", [a.addrs[0]], extra=advertisement(c_store)) as c, \
                node(tmp_path, token, "b", [a.addrs[0], c.addrs[0]]) as b, \
                serving(a, a_store) as a_bulk, serving(c, c_store, side_channel=False):
            c_asked = trio.Event()
            a_files = make_handler(a_store.find_file_by_sha256, a_store.models_dir,
                                   bulk_server=a_bulk)
            c_files = make_handler(c_store.find_file_by_sha256, c_store.models_dir)

            async def a_after_c(stream, peer) -> None:
                await c_asked.wait()
                await a_files(stream, peer)

            async def c_first(stream, peer) -> None:
                c_asked.set()
                await c_files(stream, peer)
            a.set_handler(PROTOCOL, a_after_c)
            c.set_handler(PROTOCOL, c_first)
            assert await b.view.wait_for(alive(a, c), 8)
            fetcher = MeshFileFetcher(b, piece=2**20)
            assert await fetcher.fetch(sha, len(data), tmp_path / "got", lambda n: None)
            assert (tmp_path / "got").read_bytes() == data
            assert sorted(fetcher.source.removeprefix("peer:").split("+")) == ["a", "c"]
            assert sorted(n for n, _, _ in fetcher.sources) == ["a", "c"]
            assert sum(n for _, n, _ in fetcher.sources) == len(data)

            bad = bytearray(data)
            for i in range(0, len(bad), 2**20):         # c now lies in every piece it sends
                bad[i + 1] ^= 0xFF
            (tmp_path / "c-models" / "blob" / "blob.bin").write_bytes(bytes(bad))
            c_asked = trio.Event()
            assert await fetcher.fetch(sha, len(data), tmp_path / "got2", lambda n: None)
            assert (tmp_path / "got2").read_bytes() == data and fetcher.source == "peer:a"
            assert "does not verify" in caplog.text and "asking each alone" in caplog.text

            # nobody honest left: each is asked alone, lies, is dropped; the fetch fails
            (tmp_path / "a-models" / "blob" / "blob.bin").write_bytes(bytes(bad))
            c_asked = trio.Event()
            assert not await fetcher.fetch(sha, len(data), tmp_path / "got3", lambda n: None)
            for name in ("a", "c"):
                assert f"peer {name} sent a copy of {sha[:12]}" in caplog.text, caplog.text
            assert caplog.text.count("dropped for this file") >= 2

    run(main)


class _Receiver:
    def __init__(self, s):
        self.s = s

    async def receive_some(self, n):
        return await self.s.read(n)


def test_broken_transfer_resumes_and_a_stalled_peer_is_left(tmp_path: Path) -> None:
    token = parse_token(new_token())
    data = os.urandom(5 * 2**20)
    sha = _sha(data)
    offsets: list[int] = []

    async def v2_without_side_channel(stream, req) -> bool:
        if req["v"] == 2:                 # answered, then bytes on v1 streams
            await stream.write(pack({"ok": True, "size": len(data), "bulk": None}))
            return True
        return False

    async def breaks_once(stream, peer) -> None:
        req = await read_frame(_Receiver(stream))
        if await v2_without_side_channel(stream, req):
            return
        offsets.append(req["offset"])
        await stream.write(pack({"ok": True, "size": len(data)}))
        end = 2 * 2**20 + 17 if len(offsets) == 1 else len(data)
        await stream.write(data[req["offset"]:end])
        if len(offsets) == 1:
            await stream.reset()

    async def stalls(stream, peer) -> None:
        req = await read_frame(_Receiver(stream))
        if await v2_without_side_channel(stream, req):
            return
        await stream.write(pack({"ok": True, "size": len(data)}))
        await stream.write(data[:100])
        await trio.sleep_forever()

    async def main() -> None:
        async with node(tmp_path, token, "a") as a, node(tmp_path, token, "b", [a.addrs[0]]) as b:
            a.set_handler(PROTOCOL, breaks_once)
            assert await b.view.wait_for(alive(a), 8)
            # a generous stall timeout for the good transfer: a loaded CI box is slow
            fetcher = MeshFileFetcher(b, stall_timeout=15.0)
            assert await fetcher.fetch(sha, len(data), tmp_path / "got", lambda n: None)
            # resumed from what arrived (a reset may drop bytes in flight), not from 0
            assert offsets[0] == 0 and 0 < offsets[1] <= 2 * 2**20 + 17 and len(offsets) == 2
            assert _sha((tmp_path / "got").read_bytes()) == sha

            a.set_handler(PROTOCOL, stalls)
            staller = MeshFileFetcher(b, stall_timeout=1.0)
            with trio.fail_after(60):                     # gives up; never hangs
                assert not await staller.fetch(sha, len(data), tmp_path / "got", lambda n: None)

    run(main)


def test_a_peer_that_goes_quiet_on_its_side_channel_is_left(tmp_path: Path) -> None:
    token = parse_token(new_token())
    data = os.urandom(2**20)
    sha = _sha(data)

    async def main() -> None:
        async with node(tmp_path, token, "a") as a, node(tmp_path, token, "b", [a.addrs[0]]) as b, \
                trio.open_nursery() as nursery:
            server = await nursery.start(BulkServer(host="127.0.0.1", peer_id=a.peer_id).serve)

            async def quiet(stream, peer) -> None:
                req = await read_frame(_Receiver(stream))
                offer = server.offer(peer, "files", req.get("bulk"))
                await stream.write(pack({"ok": True, "size": len(data), "bulk": offer.wire}))
                sock = await offer.accept(server)
                try:
                    await trio.sleep_forever()            # takes the request, sends nothing
                finally:
                    sock.close()

            a.set_handler(PROTOCOL, quiet)
            assert await b.view.wait_for(alive(a), 8)
            with trio.fail_after(30):
                assert not await MeshFileFetcher(b, stall_timeout=1.0).fetch(
                    sha, len(data), tmp_path / "got", lambda n: None)
            nursery.cancel_scope.cancel()

    run(main)


# --------------------------------------------------------------------------- processes
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A local HTTP server: the origin of the files no peer (rightly) has."""
    root = tmp_path_factory.mktemp("origin")
    handler = functools.partial(_QuietHandler, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, origin):
    tmp = tmp_path_factory.mktemp("peer-fetch")
    root, url = origin
    token = run_cli("token").stdout.strip()
    gguf = next((models_dir() / GGUF).glob("*.gguf"))
    gguf_sha = hashlib.sha256(gguf.read_bytes()).hexdigest()

    # A's store: the shared SmolLM2 (through a symlinked model directory), and a model
    # whose file is not what its manifest says (a peer that would send a wrong copy).
    a_models = tmp / "a-models"
    a_models.mkdir()
    (a_models / GGUF).symlink_to(models_dir() / GGUF, target_is_directory=True)
    truth = os.urandom(2**20)
    (root / "truth.bin").write_bytes(truth)
    _fake_install(a_models, "liar", "liar.bin", os.urandom(len(truth)), claims=truth)
    only_origin = os.urandom(3 * 2**20)
    (root / "only.bin").write_bytes(only_origin)

    def entry(model_id: str, uri: str, sha: str, size: int, path: str) -> dict:
        return {"id": model_id, "name": model_id, "backend": "llama", "license": "apache-2.0",
                "files": [{"uri": uri, "sha256": sha, "size": size, "path": path}],
                "config": {"context_size": 512}}
    index = tmp / "index.yaml"
    index.write_text(yaml.safe_dump({"version": 1, "models": [
        entry("peer-chat", DEAD_ORIGIN, gguf_sha, gguf.stat().st_size, gguf.name),
        entry("origin-only", f"{url}/only.bin", _sha(only_origin), len(only_origin), "only.bin"),
        entry("checked", f"{url}/truth.bin", _sha(truth), len(truth), "truth.bin"),
    ]}))
    a = MeshNode(tmp / "a", ["--name", "a", "--token", token, "--no-mdns", "--no-models",
                             "--models-dir", str(a_models)]).start()
    a_addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    a.wait_ready(timeout=60)
    b = MeshNode(tmp / "b", ["--name", "b", "--token", token, "--no-mdns", "--no-models",
                             "--models-dir", str(tmp / "b-models"), "--gallery", str(index),
                             "--peer", a_addr]).start().wait_ready(timeout=60)

    def b_sees_a_files() -> bool:
        a_node = [n for n in httpx.get(b.api + "/mesh/status", timeout=5).json()["nodes"]
                  if n["name"] == "a" and n["state"] == "alive"]
        return bool(a_node)
    assert eventually(b_sees_a_files, timeout=20)
    yield {"a": a, "b": b, "gguf": gguf, "tmp": tmp}
    for n in (a, b):
        n.stop()


def install(node: MeshNode, model_id: str) -> dict:
    r = run_cli("install", model_id, "--json", "--url", node.api, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_install_comes_from_a_peer_then_loads_and_chats(mesh):
    b = mesh["b"]
    t0 = time.monotonic()
    job = install(b, "peer-chat")
    took = time.monotonic() - t0
    assert job["state"] == "done", job
    assert job["source"] == "peer:a" and job["sources"] == {mesh["gguf"].name: "peer:a"}
    got = mesh["tmp"] / "b-models" / "peer-chat" / mesh["gguf"].name
    assert got.stat().st_size == mesh["gguf"].stat().st_size
    assert f"peer-chat/{mesh['gguf'].name}: from peer:a" in b.log_tail(10**6)
    assert "from a 100% over the side channel" in b.log_tail(10**6)   # not on libp2p
    print(f"98 MB from peer a in {took:.1f} s (CLI included)")
    assert run_cli("load", "peer-chat", "--url", b.api, timeout=120).returncode == 0
    client = openai.OpenAI(base_url=b.v1, api_key="x", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model="peer-chat", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert raw.headers["x-mesh-node"] == "b"
    assert raw.parse().choices[0].message.content
    assert run_cli("unload", "peer-chat", "--url", b.api).returncode == 0


def test_a_file_no_peer_has_comes_from_the_origin(mesh):
    job = install(mesh["b"], "origin-only")
    assert job["state"] == "done" and job["source"] == "origin", job


def test_a_wrong_copy_from_a_peer_is_rejected(mesh):
    job = install(mesh["b"], "checked")
    assert job["state"] == "done" and job["source"] == "origin", job
    log = mesh["b"].log_tail(10**6)
    assert "peer a sent a copy of" in log and "dropped for this file" in log, log[-3000:]
    assert "Traceback" not in log
