#!/usr/bin/env bash
# Sets up ./.venv with inference-mesh and everything it needs. Idempotent: a second run
# only checks. llama-cpp-python is always built from source with -DGGML_RPC=ON; a wheel
# without the RPC library (PyPI's, or one cached by pip) is refused.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
export CMAKE_ARGS="-DGGML_RPC=ON ${MESH_LLAMA_CMAKE_ARGS:-}"
WHEELS=.cache/wheels

say() { printf 'setup: %s\n' "$*" >&2; }

# System packages the tests use (speech for the transcription tests); only as root.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing espeak-ng (Debian)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
      || say "could not install espeak-ng; the transcription tests will skip"
  else
    say "espeak-ng is missing and this is not root; the transcription tests will skip"
  fi
fi
# A real browser for the dashboard tests (tests/test_dashboard.py, driven by selenium).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium and chromium-driver (Debian)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || say "could not install chromium; the dashboard's browser tests will skip"
  else
    say "chromium/chromedriver are missing and this is not root; the dashboard's browser tests will skip"
  fi
fi

[ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }
VPY=.venv/bin/python

llama_ok() {
  "$VPY" - "$LLAMA_VERSION" <<'PY' 2>/dev/null
import os, sys, importlib.metadata as md
assert md.version("llama-cpp-python") == sys.argv[1]
import llama_cpp
lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
assert os.path.exists(os.path.join(lib, "libggml-rpc.so.0")), "no RPC library"
PY
}

wheel_has_rpc() { "$VPY" -c "import sys,zipfile; n=zipfile.ZipFile(sys.argv[1]).namelist(); sys.exit(0 if any(x.endswith('llama_cpp/lib/libggml-rpc.so.0') for x in n) else 1)" "$1"; }

if ! llama_ok; then
  whl=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$whl" ] && ! wheel_has_rpc "$whl"; then say "discarding $whl: built without RPC"; rm -f "$whl"; whl=""; fi
  if [ -z "$whl" ]; then
    say "building llama-cpp-python $LLAMA_VERSION from source with $CMAKE_ARGS (takes ~5 min on 2 cores)"
    mkdir -p "$WHEELS"
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VPY" -m pip wheel -q --no-deps --no-cache-dir \
      --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS"
    whl=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)
    wheel_has_rpc "$whl" || { say "the build has no libggml-rpc: refusing it"; rm -f "$whl"; exit 1; }
  fi
  "$VPY" -m pip install -q --no-deps --force-reinstall "$whl"
  "$VPY" -m pip install -q numpy typing-extensions diskcache jinja2
fi

# The project itself; --no-binary keeps pip from ever taking a prebuilt llama-cpp-python.
"$VPY" -m pip install -q --no-binary llama-cpp-python -e ".[test]"
llama_ok || { say "llama-cpp-python lost its RPC build"; exit 1; }
say "ready: .venv/bin/mesh"
