"""llama.cpp RPC from Python: ctypes bindings, split set-up in a model worker, and the
RPC server worker process (`python -m node.rpc --port N --cache-dir DIR`).

Design notes
------------
Libraries. llama-cpp-python's `libllama.so` links `libggml.so.0` (which holds the backend
registry) and `libggml-rpc.so.0` by SONAME. The wheel also ships *copies* named `.so`;
opening one of those loads a second ggml with a second, empty registry, and every layer
silently stays on the CPU (design.md). So this module opens exactly the `.so.0` files next
to `llama_cpp`'s own library, after importing `llama_cpp`, and gets the very handles
libllama already uses.

Client side (a model worker, see node/backends/llama.py). For each server endpoint
(`127.0.0.1:PORT`, a mesh tunnel's local end), `ggml_backend_rpc_add_server` makes a
backend registry with the server's devices and `ggml_backend_register` adds it to the
global registry; llama.cpp then lists RPC devices first, in registration order.
llama-cpp-python has no `rpc_servers` argument (unknown keyword arguments are swallowed),
hence this.

Which layers go where (llama.cpp 0.3.36's `load_tensors`): with `n_gpu_layers = g`, the
last `g` of the `n_layer + 1` slots (the repeating layers, then the output layer) are
offloaded and split over the devices by `tensor_split` (cumulative fractions); the
first `n_layer + 1 - g` layers stay on the local CPU, as does the input layer (token
embeddings). The output layer would thus land on the *last* RPC server, and every token
would ship its fp32 logits back (~200 KB for a 49k vocabulary). `split_params` pins the
output layer to the local CPU with `tensor_buft_overrides` (`output.weight`,
`output_norm.weight`, and `token_embd.weight`, which tied-embedding models such as
SmolLM2 duplicate as their output); only the last hidden state (n_embd floats) comes
back. The output slot still counts in `tensor_split` (`layers[-1] + 1`), so the layer
counts come out exact: split points `k/g` and llama.cpp's `t/g` are the same correctly
rounded float divisions.

Same answer, split or not. On this node's CPU llama.cpp repacks some quantized weights
(Q4_K among them) into "extra buffer types" whose matmul kernels add in another order;
an RPC server keeps weights in the plain CPU layout. So a split model's layers compute
with other kernels than the same model unsplit, and a greedy generation may take another
token after a few dozen (Qwen2.5-Coder-1.5B Q4_K_M did, SmolLM2 Q4_1 did not). A model
config with `repack: false`, or MESH_REPACK=0 in the node's environment (its workers
inherit it), keeps the plain layout here too (`use_extra_bufts = false`): unsplit and
split then run the same kernels and answer the same greedy text (bench/rpc.py
--no-repack: identical to direct TCP's split; with repacking: not).

Server side. `ggml_backend_rpc_start_server(endpoint, cache_dir, n_threads, n_devices,
devices)` blocks forever on the CPU device and serves one client at a time (others wait
in its accept backlog). It has no authentication: it is only ever bound to loopback,
and, started by a node (`--control-fd --isolate`), to the loopback of a network
namespace of its own, which no other process can reach; the node gets its connections
through the control socket (node/isolation.py) and peers reach it through `/mesh/rpc/2`
(mesh/tunnel.py). It prints "Accepted client
connection" / "Client connection closed" on stdout (flushed), which the parent reads
(node/rpc_server.py). It ends only with its process.

A dead RPC server makes its clients abort (GGML_ABORT on any failed send/recv): that is
why both sides run in worker processes.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.isolation import isolate_network, listening, serve_control

__all__ = ["libs", "register_servers", "split_params", "SplitHandle", "main",
           "OUTPUT_TENSORS", "LOOPBACK"]

# Tensors kept on the loading node (regex, searched in the tensor name).
OUTPUT_TENSORS = r"^(output|output_norm|token_embd)\.(weight|bias)$"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
GGML_BACKEND_DEVICE_TYPE_CPU = 0
READY_WAIT = 20.0           # s for the server to listen
PARENT_CHECK = 0.5          # s between checks that the node that started the server lives


@dataclass
class _Libs:
    ggml: ctypes.CDLL
    rpc: ctypes.CDLL


_LIBS: _Libs | None = None


def libs() -> _Libs:
    """The ggml and ggml-rpc libraries libllama already uses (bound once per process)."""
    global _LIBS
    if _LIBS is not None:
        return _LIBS
    import llama_cpp  # noqa: F401  (loads libllama and, through it, libggml.so.0)
    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    ggml = ctypes.CDLL(str(libdir / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    rpc = ctypes.CDLL(str(libdir / "libggml-rpc.so.0"), mode=ctypes.RTLD_GLOBAL)
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    ggml.ggml_backend_register.argtypes, ggml.ggml_backend_register.restype = [vp], None
    ggml.ggml_backend_dev_by_type.argtypes, ggml.ggml_backend_dev_by_type.restype = [ctypes.c_int], vp
    ggml.ggml_backend_dev_buffer_type.argtypes, ggml.ggml_backend_dev_buffer_type.restype = [vp], vp
    ggml.ggml_backend_dev_count.argtypes, ggml.ggml_backend_dev_count.restype = [], sz
    ggml.ggml_backend_dev_get.argtypes, ggml.ggml_backend_dev_get.restype = [sz], vp
    ggml.ggml_backend_dev_name.argtypes, ggml.ggml_backend_dev_name.restype = [vp], cp
    ggml.ggml_backend_dev_description.argtypes, ggml.ggml_backend_dev_description.restype = [vp], cp
    rpc.ggml_backend_rpc_add_server.argtypes, rpc.ggml_backend_rpc_add_server.restype = [cp], vp
    rpc.ggml_backend_rpc_start_server.argtypes = [cp, cp, sz, sz, ctypes.POINTER(vp)]
    rpc.ggml_backend_rpc_start_server.restype = None
    _LIBS = _Libs(ggml, rpc)
    return _LIBS


def register_servers(endpoints: list[str]) -> list[str]:
    """Register RPC servers (`host:port`) as llama.cpp devices, in order; their device
    names. Connects to each at once (a server that cannot be reached aborts the process)."""
    lib = libs()
    names = []
    for ep in endpoints:
        reg = lib.rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            raise RuntimeError(f"RPC server {ep} reports no devices")
        lib.ggml.ggml_backend_register(reg)
        names.append(ep)
    return names


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass
class SplitHandle:
    """Keeps the ctypes arrays a llama_model_params points to alive (llama.cpp reads them
    during the load)."""
    endpoints: list[str]
    tensor_split: Any
    overrides: Any


def split_params(mparams: Any, config: dict[str, Any]) -> SplitHandle | None:
    """Set up a model load split over RPC servers, from a worker's config:

        rpc_servers:  ["127.0.0.1:PORT", ...]   (the tunnels' local ends, in layer order)
        rpc_layers:   [n0, n1, ...]             repeating layers per server

    Registers the servers, sets `n_gpu_layers` (the servers' layers + the output slot) and
    `tensor_split`, and pins the output layer to the CPU; the first
    `n_layer - sum(rpc_layers)` layers stay on this node. `repack: false` (split or not)
    turns llama.cpp's weight repacking off. None when the config names no RPC servers."""
    repack = config.get("repack")
    if repack is None:
        repack = os.environ.get("MESH_REPACK", "1").lower() not in ("0", "false", "no", "off")
    if not repack:       # llama.cpp's plain CPU layout, as an RPC server holds weights
        mparams.use_extra_bufts = False
    endpoints = list(config.get("rpc_servers") or [])
    if not endpoints:
        return None
    layers = [int(x) for x in config.get("rpc_layers") or [1] * len(endpoints)]
    if len(layers) != len(endpoints) or min(layers) < 0:
        raise ValueError("rpc_layers must give a layer count per RPC server")
    # A lost peer aborts this process (expected, and reported by the node): skip ggml's
    # gdb backtrace, which would only delay the exit.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    register_servers(endpoints)
    import llama_cpp
    n = max(len(endpoints), llama_cpp.llama_max_devices())
    ts = (ctypes.c_float * n)()
    for i, k in enumerate(layers):
        ts[i] = float(k)
    ts[len(layers) - 1] += 1.0          # the output layer's slot (pinned to the CPU below)
    mparams.tensor_split = ts
    mparams.n_gpu_layers = sum(layers) + 1
    lib = libs()
    cpu = lib.ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    overrides = (_BuftOverride * 2)()
    overrides[0].pattern = OUTPUT_TENSORS.encode()
    overrides[0].buft = lib.ggml.ggml_backend_dev_buffer_type(cpu)
    if not config.get("rpc_output_remote"):    # bench: the default placement, for comparison
        mparams.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
    return SplitHandle(endpoints, ts, overrides)


# ---------------------------------------------------------------- server process
def serve(host: str, port: int, cache_dir: str | None, threads: int) -> None:
    """Run llama.cpp's RPC server on host:port (loopback only); never returns."""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to bind the RPC server to {host}: it has no "
                         "authentication; peers reach it through the mesh tunnel")
    lib = libs()
    cpu = lib.ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        raise SystemExit("no CPU backend device")
    devices = (ctypes.c_void_p * 1)(cpu)
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lib.rpc.ggml_backend_rpc_start_server(endpoint.encode(),
                                          cache_dir.encode() if cache_dir else None,
                                          max(1, threads), 1, devices)
    raise SystemExit("the RPC server stopped (could it bind the port?)")


def _die_with_parent() -> None:
    """The server must not outlive its node (a `kill -9`ed node would leave it lending
    memory to nobody): a thread exits the process once it is re-parented. (Not Linux's
    PR_SET_PDEATHSIG: it fires when the spawning *thread* ends, and trio spawns from its
    thread cache, whose threads exit after 10 s idle.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="node.rpc", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--control-fd", type=int, default=None,
                    help="the node's end of the control socket (node/isolation.py)")
    ap.add_argument("--isolate", action="store_true",
                    help="serve in a network namespace of its own (needs --control-fd)")
    args = ap.parse_args(argv)
    if args.control_fd is None:
        if args.isolate:
            raise SystemExit("--isolate needs --control-fd: nothing could reach the server")
        _die_with_parent()
        serve(args.host, args.port, args.cache_dir, args.threads)
        return 1
    # unshare first, while this process has one thread (a user namespace requires it)
    isolation = isolate_network() if args.isolate else "none: isolation turned off"
    ctrl = socket.socket(fileno=args.control_fd)
    _die_with_parent()

    def run() -> None:
        try:
            serve(args.host, args.port, args.cache_dir, args.threads)
        except SystemExit as exc:
            print(exc, file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=run, daemon=True, name="rpc-server").start()
    deadline = time.monotonic() + READY_WAIT
    while not listening(args.port):
        if time.monotonic() > deadline:
            raise SystemExit(f"the RPC server did not listen on 127.0.0.1:{args.port}")
        time.sleep(0.02)
    serve_control(ctrl, args.port, isolation)
    return 1


if __name__ == "__main__":
    sys.exit(main())
