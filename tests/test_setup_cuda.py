"""scripts/setup.sh --cuda on a machine whose CUDA toolkit cannot build llama.cpp's CUDA
backend: one readable line and exit 1 before any build (a build that fails at its end
costs minutes and 90 lines of CMake). Runs a copy of the script against fake toolkits
(an `nvcc` that is a shell script), so nothing is built or installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _fake(tmp: Path, *, cublas: bool, libcuda: bool, gpu: bool) -> dict[str, str]:
    root = tmp / "cuda"
    (root / "bin").mkdir(parents=True)
    (root / "lib64" / "stubs").mkdir(parents=True)
    (root / "include").mkdir()
    tools = tmp / "tools"
    tools.mkdir()
    names = ["espeak-ng", "chromium", "chromedriver"] + (["nvidia-smi"] if gpu else [])
    for exe in [root / "bin" / "nvcc", *(tools / n for n in names)]:
        exe.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\n")
        exe.chmod(0o755)
    if cublas:
        (root / "include" / "cublas_v2.h").write_text("")
    if libcuda:
        (root / "lib64" / "stubs" / "libcuda.so").write_text("")
    clone = tmp / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", clone / "scripts" / "setup.sh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return {**env, "PATH": f"{root / 'bin'}:{tools}:/usr/bin:/bin", "MESH_GPU": "cuda",
            "PYTHON": "/bin/false",            # got past the checks: fail at once, build nothing
            "MESH_WHEEL_CACHE": str(tmp / "cache")}


def _setup(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(tmp / "clone" / "scripts" / "setup.sh")], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("missing, says", [
    ("cublas", "has no cuBLAS (include/cublas_v2.h)"),
    ("libcuda", "no libcuda"),
    ("gpu", "no GPU here to build for"),
])
def test_a_toolkit_that_cannot_build_is_refused_in_one_line(tmp_path, missing, says) -> None:
    env = _fake(tmp_path, cublas=missing != "cublas", libcuda=missing != "libcuda",
                gpu=missing != "gpu")
    r = _setup(tmp_path, env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup: --cuda") and says in lines[0], r.stderr
    assert not (tmp_path / "clone" / ".venv").exists()


def test_naming_the_architectures_and_no_vmm_gets_past_the_checks(tmp_path) -> None:
    env = _fake(tmp_path, cublas=True, libcuda=False, gpu=False)
    env["MESH_LLAMA_CMAKE_ARGS"] = "-DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NO_VMM=ON"
    r = _setup(tmp_path, env)
    assert "setup: --cuda" not in r.stderr, r.stderr
    assert "creating .venv" in r.stderr and r.returncode != 0     # PYTHON=/bin/false stopped it
