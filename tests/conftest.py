import shutil

import pytest

from tests.procs import MeshNode


@pytest.fixture(scope="session")
def node(tmp_path_factory):
    """One node serving the two default models, shared by the API tests."""
    n = MeshNode(tmp_path_factory.mktemp("node1"), ["--name", "node1", "--no-mdns"],
                 env={"MESH_MAX_BODY_MB": "4"}).start()
    try:
        n.wait_ready()
        yield n
    finally:
        n.stop()


@pytest.fixture
def client(node):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory):
    """A WAV of espeak-ng saying 'hello world'."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it as root)")
    import subprocess
    path = tmp_path_factory.mktemp("audio") / "hello.wav"
    subprocess.run([exe, "-w", str(path), "hello world"], check=True)
    return path
