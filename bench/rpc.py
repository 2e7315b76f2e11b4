"""Split over llama.cpp RPC: unsplit vs through the mesh tunnel vs direct TCP, same run.

Two real lending nodes (`mesh up --offer-memory 1GiB --no-models`, b and c) on 127.0.0.1
with one token. This process is the loading node: it joins the mesh (mesh/p2p/node.py), and
runs model workers with node/workers.py exactly as a node does, in four set-ups:

  unsplit   SmolLM2 in one worker, nothing remote
  tunnel    layers split here / b / c, each peer reached through `/mesh/rpc/1`
            (mesh/tunnel.py: a loopback listener per peer, one stream per connection)
  direct    the same split over plain TCP to the same RPC servers' loopback ports
  default   the tunnel split with llama.cpp's default placement (output layer on the last
            peer: its fp32 logits come back every token), for the bytes per token

Each set-up: load time (worker start to `ready`, weights sent over RPC included), then
rounds of greedy generation (`--tokens` tokens; decode tokens/s from the first to the
last token, medians). Bytes per generated token are counted in the tunnels (both
directions, steady-state: a round's bytes / its tokens). Rounds of the split set-ups
alternate so drifting machine load hits them alike.

    .venv/bin/python -m bench.rpc [--rounds 3] [--tokens 128] [--layers 10,10,10]

Targets (issue 6): tunnel >= 0.8 x direct tokens/s; <= 10 KB per token with the output
layer kept here (vs ~200 KB by default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import psutil
import trio

from mesh.p2p import open_p2p
from mesh.token import parse_token
from mesh.tunnel import TunnelStats, serve_tunnel
from mesh.wire.state import NodeState
from mesh.wire.inference import (Delta, Done, Failed, Generate, Message, Sampling,
                                 error_from_failed)
from node.workers import ModelSpec, WorkerPool
from tests.procs import MeshNode, models_dir, run_cli

MODEL = "smollm2-135m-instruct"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a long story about a dragon who learns to read."


def rpc_port(node: MeshNode) -> int:
    for kid in psutil.Process(node.proc.pid).children(recursive=True):
        if "node.rpc" in " ".join(kid.cmdline()):
            for c in kid.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    return c.laddr.port
    raise RuntimeError(f"no RPC server under {node.home}")


async def generate(worker, tokens: int) -> tuple[int, float]:
    """(completion tokens, decode tokens/s) of one greedy generation."""
    first = last = None
    n = 0
    req = Generate(model=worker.id, messages=(Message(role="user", content=PROMPT),),
                   max_tokens=tokens, sampling=Sampling(temperature=0.0, seed=1))
    async with worker.open(req) as events:
        async for ev in events:
            if isinstance(ev, Failed):
                raise error_from_failed(ev)
            if isinstance(ev, Delta):
                now = time.perf_counter()
                first = first or now
                last = now
            elif isinstance(ev, Done):
                n = ev.usage.completion_tokens
    rate = (n - 1) / (last - first) if first and last and last > first and n > 1 else float("nan")
    return n, rate


async def run(args, token: str, peers: dict[str, tuple[str, int]], home: Path) -> dict:
    path = str(models_dir() / MODEL / FILE)
    layers = [int(x) for x in args.layers.split(",")]
    base = {"context_size": 2048, "parallel": 1, "threads": args.threads, "embeddings": False}
    results: dict[str, dict] = {}
    peers = dict(list(peers.items())[:len(layers) - 1])
    async with open_p2p(home=home, token=parse_token(token), name="bench",
                        listen_host="127.0.0.1", p2p_port=0, peers=[a for a, _ in peers.values()],
                        mdns=False, state=lambda: NodeState(name="bench")) as p2p:
        ids = {n: a.split("/p2p/")[1] for n, (a, _) in peers.items()}
        with trio.fail_after(30):
            while not all(p2p.is_connected(i) for i in ids.values()):
                await trio.sleep(0.05)
        async with trio.open_nursery() as nursery:
            pool = WorkerPool(home / "run")
            await nursery.start(pool.serve)
            stats = {n: TunnelStats() for n in ids}
            broken: list[str] = []
            tports = []
            for n, pid in ids.items():
                tports.append(await nursery.start(partial(
                    serve_tunnel, p2p, pid, on_broken=broken.append, stats=stats[n])))
            setups = {
                "unsplit": {},
                "tunnel": {"rpc_servers": [f"127.0.0.1:{p}" for p in tports], "rpc_layers": layers[1:]},
                "direct": {"rpc_servers": [f"127.0.0.1:{p}" for _, p in peers.values()],
                           "rpc_layers": layers[1:]},
                "default": {"rpc_servers": [f"127.0.0.1:{p}" for p in tports], "rpc_layers": layers[1:],
                            "rpc_output_remote": True},
            }
            for name, extra in setups.items():
                results[name] = {"load": [], "rate": [], "bytes": []}
            order = ["unsplit", "tunnel", "direct", "default"]
            for rnd in range(args.loads):
                for name in (order if rnd % 2 == 0 else ["unsplit", "direct", "tunnel", "default"]):
                    spec = ModelSpec(id=f"{MODEL}-{name}", backend="llama", path=path,
                                     config={**base, **setups[name]})
                    t0 = time.perf_counter()
                    w = await pool.load(spec, wait=True)
                    results[name]["load"].append(time.perf_counter() - t0)
                    await generate(w, 8)                         # warm-up
                    for _ in range(args.rounds):
                        b0 = sum(s.sent + s.received for s in stats.values())
                        n, rate = await generate(w, args.tokens)
                        b1 = sum(s.sent + s.received for s in stats.values())
                        results[name]["rate"].append(rate)
                        if name in ("tunnel", "default"):
                            results[name]["bytes"].append((b1 - b0) / max(1, n))
                    await pool.unload(spec.id)
                    await trio.sleep(0.5)      # the RPC servers drop this client
            if broken:
                print("tunnel errors:", broken)
            nursery.cancel_scope.cancel()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="generations per load")
    ap.add_argument("--loads", type=int, default=2, help="loads per set-up")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", default="10,10,10",
                    help="layers here,b[,c] (sum 30): one peer or two")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    args = ap.parse_args()
    token = run_cli("token").stdout.strip()
    env = {"MESH_TOKEN": token, "MESH_RPC_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        nodes = {n: MeshNode(Path(tmp) / n, ["--name", n, "--no-models", "--no-mdns",
                                             "--offer-memory", "1GiB"], env=env).start()
                 for n in ("b", "c")}
        try:
            peers = {}
            for n, node in nodes.items():
                addr = node.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
                node.wait_ready()
                peers[n] = (addr, rpc_port(node))
            res = trio.run(run, args, token, peers, Path(tmp) / "bench")
        finally:
            for node in nodes.values():
                node.stop()
    med = {k: {m: statistics.median(v[m]) if v[m] else float("nan") for m in ("load", "rate", "bytes")}
           for k, v in res.items()}
    print(f"model {MODEL}, layers here/b/c {args.layers}, {args.loads} loads x {args.rounds} "
          f"rounds of {args.tokens} tokens, {args.threads} thread(s) per process, "
          f"{os.cpu_count()} cores, greedy")
    print(f"{'set-up':<10}{'load s':>9}{'decode tok/s':>14}{'bytes/token':>13}")
    for k, m in med.items():
        b = f"{m['bytes'] / 1024:.1f} KB" if m["bytes"] == m["bytes"] else "-"
        print(f"{k:<10}{m['load']:>9.2f}{m['rate']:>14.1f}{b:>13}")
    t, d, u = med["tunnel"], med["direct"], med["unsplit"]
    print(f"ratio tunnel/direct: decode {t['rate'] / d['rate']:.3f} (target >= 0.8), "
          f"load {t['load'] / d['load']:.2f}x")
    print(f"ratio split(tunnel)/unsplit: decode {t['rate'] / u['rate']:.3f}")
    print(f"bytes per token: {t['bytes'] / 1024:.1f} KB with the output layer here "
          f"(target <= 10 KB) vs {med['default']['bytes'] / 1024:.1f} KB with llama.cpp's default")


if __name__ == "__main__":
    main()
