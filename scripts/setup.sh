#!/usr/bin/env bash
# Sets up ./.venv with inference-mesh and everything it needs. Idempotent: a second run
# only checks.
#
# llama-cpp-python is built from source with the llama.cpp RPC backend (-DGGML_RPC=ON);
# a wheel without libggml-rpc (PyPI's, or one cached by pip) is refused. The built wheel
# is kept outside the clone, in the user's cache dir
# (${MESH_WHEEL_CACHE:-${XDG_CACHE_HOME:-~/.cache}/inference-mesh/wheels}), keyed by the
# version, the build flags, the compiler and this CPU's flags (the build is -march=native),
# so a second clone on the same machine installs it in seconds instead of rebuilding.
#
# The build is trimmed to what the project loads: libllama, libggml{,-base,-cpu,-rpc}.
# Measured on 2 cores (ninja's per-target times): of 1078 s of compile jobs, llama.cpp's
# `common` library took 479 s and libmtmd (vision projectors) 224 s; llama-cpp-python
# forces common on but ships nothing that uses it, and nothing here loads libmtmd, so
# -DLLAVA_BUILD=OFF and a CMake hook that turns LLAMA_BUILD_COMMON off leave 340 s (32%).
# (Tests, tools, examples and the server are already off when llama.cpp is a subproject.)
#
#   bash scripts/setup.sh [--cuda]     MESH_GPU=cuda is the same as --cuda: builds with
#                                      -DGGML_CUDA=ON (needs nvcc and cuBLAS: a CUDA
#                                      toolkit; on a machine without a GPU, name the
#                                      architectures in MESH_LLAMA_CMAKE_ARGS)
#   MESH_LLAMA_CMAKE_ARGS="..."        more CMake flags (part of the cache key)
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
GPU=${MESH_GPU:-cpu}
for arg in "$@"; do
  case "$arg" in
    --cuda) GPU=cuda ;;
    *) printf 'setup: unknown option %s (only --cuda)\n' "$arg" >&2; exit 2 ;;
  esac
done
CACHE=${MESH_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-mesh/wheels}
HOOK_TEXT='set(LLAMA_BUILD_COMMON OFF)  # inference-mesh: nothing llama-cpp-python ships uses it'
FLAGS="-DGGML_RPC=ON -DLLAVA_BUILD=OFF"
case "$GPU" in
  cpu) ;;
  cuda) FLAGS="$FLAGS -DGGML_CUDA=ON" ;;
  *) printf 'setup: MESH_GPU=%s: expected cpu or cuda\n' "$GPU" >&2; exit 2 ;;
esac
# AMX: llama.cpp's AMX kernels (ggml-cpu/amx, picked by -march=native on Sapphire Rapids
# and later) crash on some of these CPUs: on a 2-core Xeon VM here every prompt of more
# than one token died with a general protection fault in libggml-cpu (ggml-org/llama.cpp
# #20824; Ollama's and DSPy's CI hit the same). GCC's explicit -mno-amx-* win over
# -march=native, so the rest of the CPU's ISA (AVX-512, VNNI) stays; the AVX-512
# repacked kernels still apply.
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  FLAGS="$FLAGS '-DCMAKE_C_FLAGS=$NOAMX' '-DCMAKE_CXX_FLAGS=$NOAMX'"
fi
FLAGS="$FLAGS ${MESH_LLAMA_CMAKE_ARGS:-}"

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

if [ "$GPU" = cuda ] && ! command -v nvcc >/dev/null 2>&1; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH"
  else
    say "--cuda needs a CUDA toolkit (nvcc on PATH or in /usr/local/cuda/bin); none found"
    exit 1
  fi
fi
if [ "$GPU" = cuda ]; then
  # What llama.cpp's CUDA backend links, checked before a build that would fail at its
  # end: cuBLAS (a toolkit of nvcc and the runtime only has none), and unless
  # -DGGML_CUDA_NO_VMM=ON the driver library (libcuda; the toolkit's stubs/ will do).
  # the toolkit nvcc belongs to (nvcc may be a link or a wrapper script): its own _HERE_
  here=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)
  CUDA_HOME=$(dirname "${here:-$(dirname "$(readlink -f "$(command -v nvcc)")")}")
  if [ ! -e "$CUDA_HOME/include/cublas_v2.h" ] && [ ! -e "$CUDA_HOME/targets/$(uname -m)-linux/include/cublas_v2.h" ]; then
    say "--cuda: this CUDA toolkit ($CUDA_HOME) has no cuBLAS (include/cublas_v2.h); install its cuBLAS (e.g. the cuda-libraries-dev package)"
    exit 1
  fi
  case " ${MESH_LLAMA_CMAKE_ARGS:-} " in
    *GGML_CUDA_NO_VMM=ON*) ;;
    *) found=""
       for f in "$CUDA_HOME"/lib64/libcuda.so* "$CUDA_HOME"/lib64/stubs/libcuda.so* \
                /usr/lib/"$(uname -m)"-linux-gnu/libcuda.so* /usr/lib64/libcuda.so*; do
         [ -e "$f" ] && found=$f && break
       done
       if [ -z "$found" ]; then
         say "--cuda: no libcuda (the NVIDIA driver, or $CUDA_HOME/lib64/stubs); install one, or build without it: MESH_LLAMA_CMAKE_ARGS=-DGGML_CUDA_NO_VMM=ON"
         exit 1
       fi ;;
  esac
  case " ${MESH_LLAMA_CMAKE_ARGS:-} " in
    *CMAKE_CUDA_ARCHITECTURES=*) ;;
    *) if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
         say "--cuda: no GPU here to build for (llama.cpp builds for the GPUs it finds); name them: MESH_LLAMA_CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 (an H100/H200; 89 an L4/RTX 40xx, 86 an RTX 30xx, 80 an A100)"
         exit 1
       fi ;;
  esac
fi

[ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }
VPY=.venv/bin/python

# The cache key: everything that changes the binary.
key_text() {
  printf '%s\n' "llama-cpp-python==$LLAMA_VERSION" "$FLAGS" "$HOOK_TEXT" "$(uname -m)" \
    "$( (${CC:-cc} --version || true) 2>/dev/null | head -n1)" \
    "$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
  [ "$GPU" = cuda ] && nvcc --version | tail -n1
  return 0
}
KEY=$(key_text | sha256sum | cut -c1-16)
DIR="$CACHE/llama_cpp_python-$LLAMA_VERSION-$GPU-$KEY"

llama_ok() {   # llama_ok [why]: with "why", the reason it is not, on stdout
  "$VPY" - "$LLAMA_VERSION" "$GPU" "${1:-}" <<'PY' 2>/dev/null
import os, sys, importlib.metadata as md
try:
    assert md.version("llama-cpp-python") == sys.argv[1], f"not version {sys.argv[1]}"
    import llama_cpp
    lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    assert os.path.exists(os.path.join(lib, "libggml-rpc.so.0")), "built without RPC"
    if sys.argv[2] == "cuda":
        assert os.path.exists(os.path.join(lib, "libggml-cuda.so.0")), "built without CUDA"
except Exception as exc:              # the reason, as one line, for the caller
    if sys.argv[3] == "why":
        print(str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)
    sys.exit(1)
PY
}

wheel_ok() {   # the wheel has the RPC library (and CUDA's, for --cuda)
  "$VPY" - "$1" "$GPU" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["llama_cpp/lib/libggml-rpc.so.0"] + (["llama_cpp/lib/libggml-cuda.so.0"] if sys.argv[2] == "cuda" else [])
sys.exit(0 if all(any(n.endswith(x) for n in names) for x in need) else 1)
PY
}

cached_wheel() { ls "$DIR"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true; }

build_wheel() {  # into $DIR, under a lock so two clones set up at once build it once
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  command -v flock >/dev/null 2>&1 && flock 9
  [ -n "$(cached_wheel)" ] && return 0
  tmp=$(mktemp -d)
  printf '%s\n' "$HOOK_TEXT" > "$tmp/hook.cmake"
  if [ "$GPU" = cuda ]; then took="~30 min on 2 cores for one GPU architecture"; else took="3-6 min on 2 cores"; fi
  say "building llama-cpp-python $LLAMA_VERSION from source ($GPU: $FLAGS; $took)"
  t0=$(date +%s)
  CMAKE_ARGS="$FLAGS -DCMAKE_PROJECT_llama.cpp_INCLUDE=$tmp/hook.cmake" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VPY" -m pip wheel -q --no-deps --no-cache-dir \
    --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -w "$tmp"
  whl=$(ls "$tmp"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)
  if ! wheel_ok "$whl"; then say "the build lacks libggml-rpc (or, with --cuda, libggml-cuda): refusing it"; rm -rf "$tmp"; exit 1; fi
  key_text > "$tmp/key.txt"
  mv "$tmp/key.txt" "$DIR/key.txt"
  mv "$whl" "$DIR/"                     # same file system as the lock: atomic
  rm -rf "$tmp"
  say "built in $(( $(date +%s) - t0 )) s; cached in $DIR"
}

if ! llama_ok || [ "$(cat .venv/.mesh-llama-key 2>/dev/null)" != "$KEY" ]; then
  whl=$(cached_wheel)
  if [ -n "$whl" ] && ! wheel_ok "$whl"; then say "discarding $whl: built without RPC"; rm -f "$whl"; whl=""; fi
  if [ -z "$whl" ]; then
    build_wheel
    whl=$(cached_wheel)
  else
    say "llama-cpp-python $LLAMA_VERSION from the wheel cache ($DIR)"
  fi
  "$VPY" -m pip install -q --no-deps --force-reinstall "$whl"   # its deps come with the project's
  printf '%s\n' "$KEY" > .venv/.mesh-llama-key   # which build this is (flags, CPU, compiler)
  rm -f .venv/.mesh-deps
fi

# The project and its dependencies. The first time (for this pyproject.toml and Python)
# pip resolves them against the package index; the wheels it installed are then kept in
# the cache (a wheelhouse), so the next clone installs them without an index (resolving
# 150 packages from the index took ~50 s here). --no-binary keeps pip from ever taking a
# prebuilt llama-cpp-python; with --no-deps from the wheelhouse it is never touched.
DEPS="$CACHE/deps-$( (cat pyproject.toml; "$VPY" -VV; uname -m) | sha256sum | cut -c1-16)"
from_wheelhouse() {
  [ -s "$DEPS/requirements.txt" ] || return 1
  "$VPY" -m pip install -q --no-index --find-links "$DEPS" --no-deps --no-compile \
    -r "$DEPS/requirements.txt" \
  && "$VPY" -m pip install -q --no-index --find-links "$DEPS" --no-deps -e .
}
keep_wheelhouse() {  # every wheel this project resolves to (pip's report names them), in $DEPS
  local tmp report; tmp=$(mktemp -d "$CACHE/deps.XXXXXX"); report="$tmp/report.json"
  "$VPY" -m pip install -q --dry-run --ignore-installed --no-binary llama-cpp-python \
    --report "$report" -e ".[test]" "setuptools>=68" wheel >/dev/null 2>&1 \
  && "$VPY" - "$report" "$tmp" <<'PY' || { rm -rf "$tmp"; say "could not keep the dependencies"; return 0; }
import json, os, shutil, subprocess, sys, urllib.parse, urllib.request
report, out = json.load(open(sys.argv[1])), sys.argv[2]
reqs = []
for item in report["install"]:
    meta, url = item["metadata"], item["download_info"]["url"]
    if meta["name"].lower().replace("_", "-") in ("inference-mesh", "llama-cpp-python"):
        continue
    dest = os.path.join(out, os.path.basename(urllib.parse.urlsplit(url).path))
    if url.startswith("file://"):
        shutil.copy(urllib.parse.unquote(urllib.parse.urlsplit(url).path), dest)
    else:
        urllib.request.urlretrieve(url, dest)
    if not dest.endswith(".whl"):          # an sdist: keep it built
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, dest],
                       check=True, stdout=subprocess.DEVNULL)
        os.remove(dest)
    if meta["name"].lower() not in ("setuptools", "wheel"):
        reqs.append(f"{meta['name']}=={meta['version']}")
open(os.path.join(out, "requirements.txt"), "w").write("\n".join(reqs) + "\n")
PY
  rm -f "$report"
  rm -rf "$DEPS" && mv "$tmp" "$DEPS" && say "dependencies kept in $DEPS ($(ls "$DEPS" | wc -l) files)"
}
if [ "$(cat .venv/.mesh-deps 2>/dev/null)" = "$DEPS" ]; then
  :                                                   # set up already for this pyproject
elif from_wheelhouse; then
  say "dependencies from the cache ($DEPS)"
else
  mkdir -p "$CACHE"
  "$VPY" -m pip install -q --no-binary llama-cpp-python -e ".[test]"
  keep_wheelhouse
fi
printf '%s\n' "$DEPS" > .venv/.mesh-deps
if ! llama_ok; then
  say "llama-cpp-python does not load: $(llama_ok why)"
  [ "$GPU" = cuda ] && say "(its CUDA libraries must be on the loader path: ldconfig, or LD_LIBRARY_PATH=$CUDA_HOME/lib64)"
  exit 1
fi
say "ready: .venv/bin/mesh"
