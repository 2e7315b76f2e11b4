"""Split over llama.cpp RPC: unsplit vs through the mesh tunnel vs direct TCP, same run.

Real lending nodes (`mesh up --offer-memory`) on 127.0.0.1 with one token: b and c hold
the model file (the shared models directory), b2 and c2 do not (an empty one). This
process is the loading node: it joins the mesh (mesh/p2p/node.py) and runs model workers
with node/workers.py exactly as a node does, in these set-ups:

  unsplit   the model in one worker, nothing remote: the largest single node that can
            hold it (this machine, uncapped)
  tunnel    layers split here / b / c through `/mesh/rpc/2` on the bulk side channel;
            b and c fill their weights from their own copy (mesh/tunnel.py, FILL)
  no-copy   the same to b2 / c2, which have no copy: the weights cross the side channel
  libp2p    the tunnel split with every byte on libp2p streams (the old path)
  direct    the same split over plain TCP to b's and c's RPC servers' loopback ports

Each set-up: load time (worker start to `ready`, weights included), then rounds of greedy
generation (`--tokens` tokens; decode tokens/s from the first to the last token, medians),
and the greedy text, compared across set-ups. Bytes per generated token are counted in the
tunnels (both directions, records and framing included: a round's bytes / its tokens).
Loads alternate their order between rounds so drifting machine load hits them alike.

    .venv/bin/python -m bench.rpc [--model qwen2.5-coder-1.5b-instruct] [--layers 0,14,14]

Targets (issue 16): tunnel >= 0.9 x direct tokens/s; <= 10 KB per token with 2 lenders
(SmolLM2: hidden states of 576 floats; Qwen2.5-1.5B's are 1536, 6 KB each way per peer).
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

from gallery.store import Store
from mesh.p2p import open_p2p
from mesh.token import parse_token
from mesh.tunnel import ModelFile, TunnelStats, serve_tunnel
from mesh.wire.inference import Delta, Done, Failed, Generate, Message, Sampling, error_from_failed
from mesh.wire.state import NodeState
from node.placement import model_info, tensor_table
from node.workers import ModelSpec, WorkerPool
from tests.procs import MeshNode, models_dir, run_cli

PROMPT = "Write a long story about a dragon who learns to read."
SETUPS = ("unsplit", "tunnel", "no-copy", "libp2p", "direct")


def rpc_port(node: MeshNode) -> int:
    for kid in psutil.Process(node.proc.pid).children(recursive=True):
        if "node.rpc" in " ".join(kid.cmdline()):
            for c in kid.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    return c.laddr.port
    raise RuntimeError(f"no RPC server under {node.home}")


async def generate(worker, tokens: int) -> tuple[int, float, str]:
    """(completion tokens, decode tokens/s, text) of one greedy generation."""
    first = last = None
    n, text = 0, []
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
                text.append(ev.text or "")
            elif isinstance(ev, Done):
                n = ev.usage.completion_tokens
    rate = (n - 1) / (last - first) if first and last and last > first and n > 1 else float("nan")
    return n, rate, "".join(text)


async def run(args, token: str, peers: dict[str, tuple[str, int]], home: Path, path: str,
              sha: str) -> dict:
    layers = [int(x) for x in args.layers.split(",")]
    base = {"context_size": args.ctx, "parallel": 1, "threads": args.threads, "embeddings": False,
            **({"repack": False} if args.no_repack else {})}
    results: dict[str, dict] = {k: {"load": [], "rate": [], "bytes": [], "text": set()} for k in SETUPS}
    async with open_p2p(home=home, token=parse_token(token), name="bench",
                        listen_host="127.0.0.1", p2p_port=0, peers=[a for a, _ in peers.values()],
                        mdns=False, state=lambda: NodeState(name="bench")) as p2p:
        ids = {n: a.split("/p2p/")[1] for n, (a, _) in peers.items()}
        with trio.fail_after(60):
            while not all(p2p.is_connected(i) and p2p.view.get(i) for i in ids.values()):
                await trio.sleep(0.05)
        model = ModelFile(sha256=sha, path=path, tensors=tensor_table(path))
        async with trio.open_nursery() as nursery:
            pool = WorkerPool(home / "run")
            await nursery.start(pool.serve)
            broken: list[str] = []
            stats: dict[str, list[TunnelStats]] = {}

            async def tunnels(setup: str, names: list[str], **kw) -> list[int]:
                ports = []
                stats[setup] = []
                for n in names:
                    stats[setup].append(TunnelStats())
                    ports.append(await nursery.start(partial(
                        serve_tunnel, p2p, ids[n], on_broken=broken.append,
                        stats=stats[setup][-1], **kw)))
                return ports

            lenders = ["b", "c"][:len(layers) - 1]
            tun = await tunnels("tunnel", lenders, model=model)
            nc = await tunnels("no-copy", ["b2", "c2"][:len(layers) - 1])
            lp = await tunnels("libp2p", lenders, model=model, side_channel=False)
            remote = {"rpc_layers": layers[1:]}
            setups = {
                "unsplit": {},
                "tunnel": {"rpc_servers": [f"127.0.0.1:{p}" for p in tun], **remote},
                "no-copy": {"rpc_servers": [f"127.0.0.1:{p}" for p in nc], **remote},
                "libp2p": {"rpc_servers": [f"127.0.0.1:{p}" for p in lp], **remote},
                "direct": {"rpc_servers": [f"127.0.0.1:{peers[n][1]}" for n in lenders], **remote},
            }
            for rnd in range(args.loads):
                order = [k for k in SETUPS if k in args.setups]
                for name in (order if rnd % 2 == 0 else order[::-1]):
                    spec = ModelSpec(id=f"bench-{name}", backend="llama", path=path,
                                     config={**base, **setups[name]})
                    t0 = time.perf_counter()
                    w = await pool.load(spec, wait=True)
                    results[name]["load"].append(time.perf_counter() - t0)
                    await generate(w, 4)                         # warm-up
                    for _ in range(args.rounds):
                        st = stats.get(name, [])
                        b0 = sum(s.sent + s.received for s in st)
                        n, rate, text = await generate(w, args.tokens)
                        b1 = sum(s.sent + s.received for s in st)
                        results[name]["rate"].append(rate)
                        results[name]["text"].add(text)
                        if st:
                            results[name]["bytes"].append((b1 - b0) / max(1, n))
                    await pool.unload(spec.id)
                    await trio.sleep(0.5)      # the RPC servers drop this client
                    print(f"load {rnd + 1} {name}: {results[name]['load'][-1]:.2f} s, "
                          f"{results[name]['rate'][-1]:.1f} tok/s", flush=True)
            if broken:
                print("tunnel errors:", broken)
            for name in ("tunnel", "no-copy", "libp2p"):
                if name in args.setups:
                    print(f"{name} tunnels: " + "; ".join(
                        f"sent {s.sent / 1e6:.1f} MB, filled {s.filled / 1e6:.1f} MB, via {s.via}"
                        for s in stats[name]))
            nursery.cancel_scope.cancel()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=3, help="generations per load")
    ap.add_argument("--loads", type=int, default=2, help="loads per set-up")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--layers", default=None,
                    help="layers here,b[,c]; default 0 here and the rest halved over b, c")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--no-repack", action="store_true",
                    help="llama.cpp's plain weight layout here too (node/rpc.py: same answer)")
    args = ap.parse_args()
    args.setups = args.setups.split(",")
    installed = Store(models_dir()).get(args.model)
    if installed is None:
        raise SystemExit(f"{args.model} is not installed in {models_dir()}")
    path = str(installed.path)
    sha = next(f.sha256 for f in installed.files if installed.dir / f.path == installed.path)
    n_layer = model_info(path).n_layer
    args.layers = args.layers or f"0,{n_layer - n_layer // 2},{n_layer // 2}"
    token = run_cli("token").stdout.strip()
    # MESH_RPC_ISOLATE=0: the lenders' RPC servers on the host's loopback, so that "direct"
    # (the worker connecting to them with no tunnel) can reach them; the tunnel setups use
    # the same kind of socket either way (node/isolation.py hands the node a connected one)
    env = {"MESH_TOKEN": token, "MESH_RPC_THREADS": str(args.threads), "MESH_RPC_ISOLATE": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        nodes = {n: MeshNode(Path(tmp) / n, ["--name", n, "--no-models", "--no-mdns",
                                             "--offer-memory", "4GiB",
                                             *(["--models-dir", str(Path(tmp) / "empty")]
                                               if n.endswith("2") else [])], env=env).start()
                 for n in ("b", "c", "b2", "c2")}
        try:
            peers = {}
            for n, node in nodes.items():
                addr = node.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
                node.wait_ready()
                peers[n] = (addr, rpc_port(node))
            res = trio.run(run, args, token, peers, Path(tmp) / "bench", path, sha)
        finally:
            for node in nodes.values():
                node.stop()
    med = {k: {m: statistics.median(v[m]) if v[m] else float("nan") for m in ("load", "rate", "bytes")}
           for k, v in res.items() if v["load"]}
    print(f"model {args.model}, layers here/b/c {args.layers}, {args.loads} loads x {args.rounds} "
          f"rounds of {args.tokens} tokens, ctx {args.ctx}, {args.threads} thread(s) per process, "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}, greedy")
    print(f"{'set-up':<10}{'load s':>9}{'decode tok/s':>14}{'bytes/token':>13}")
    for k, m in med.items():
        b = f"{m['bytes'] / 1024:.1f} KB" if m["bytes"] == m["bytes"] else "-"
        print(f"{k:<10}{m['load']:>9.2f}{m['rate']:>14.1f}{b:>13}")
    texts = {k: v["text"] for k, v in res.items() if v["text"]}
    same = {k: t == texts.get("direct") for k, t in texts.items()}
    print("greedy text identical to direct TCP's: " + ", ".join(f"{k} {v}" for k, v in same.items()))
    if "tunnel" in med and "direct" in med:
        t, d = med["tunnel"], med["direct"]
        print(f"ratio tunnel/direct: decode {t['rate'] / d['rate']:.3f} (target >= 0.9), "
              f"load {t['load'] / d['load']:.2f}x")
    if "tunnel" in med and "unsplit" in med:
        print(f"ratio split(tunnel)/unsplit: decode {med['tunnel']['rate'] / med['unsplit']['rate']:.3f}")
    if "tunnel" in med and "no-copy" in med:
        print(f"load with the lenders' own copies {med['tunnel']['load']:.2f} s vs "
              f"{med['no-copy']['load']:.2f} s with the weights sent")


if __name__ == "__main__":
    main()
