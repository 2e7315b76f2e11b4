"""Fuzzing the whole HTTP API from its own /openapi.json with schemathesis, on a real node
with a real model: no 5xx, no hang (every request has a deadline), every error in
OpenAI's shape. The node has its own home and models dir (hard links of the shared
model files, installed first by the module's fixture), since the fuzzer may unload,
remove, or create keys."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.procs import MeshNode, models_dir
from tests.test_models_cli import install_models

CHAT = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    install_models(tmp_path_factory.mktemp("install") / "home", CHAT)
    return models_dir() / CHAT


@pytest.mark.timeout(900)
def test_schemathesis_finds_no_server_error(tmp_path, installed):
    st = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    if st is None:
        pytest.skip("schemathesis is not installed (it is in the [test] extra)")
    mine = tmp_path / "models"
    shutil.copytree(installed, mine / CHAT, copy_function=os.link)
    node = MeshNode(tmp_path / "home", ["--model", CHAT, "--no-mdns", "--models-dir", str(mine)],
                    env={"MESH_MAX_TOKENS": "16", "MESH_MAX_BODY_MB": "1"}).start().wait_ready()
    try:
        doc = httpx.get(node.api + "/openapi.json").json()
        r = subprocess.run(
            [st, "run", f"{node.api}/openapi.json", "--checks",
             "not_a_server_error,response_schema_conformance", "--max-examples", "10",
             "--request-timeout", "120", "--workers", "1", "--seed", "1",
             "--phases", "examples,coverage,fuzzing", "--no-color",
             "--suppress-health-check", "all", "--generation-database", "none",
             "--report", "ndjson", "--report-dir", str(tmp_path / "report")],
            capture_output=True, text=True, timeout=800, cwd=tmp_path)
        out = r.stdout + r.stderr
        m = re.search(r"(\d+) generated, (\d+) passed", out)
        print(out[-3000:])
        print(f"schemathesis: {m and m.group(1)} test cases over {len(doc['paths'])} paths")
        assert r.returncode == 0, out[-6000:]
        assert m and int(m.group(1)) >= 300 and m.group(1) == m.group(2), out[-3000:]
        assert "Traceback" not in node.log_tail(10**7)
    finally:
        node.stop()
