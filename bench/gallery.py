"""Peer fetch (/mesh/files/1) vs a plain HTTP download of the same model file, on loopback.

Same file (the installed Qwen2.5-Coder-1.5B GGUF, 1.1 GB, or SmolLM2's 98 MB with
--model), same disk, in one run, rounds alternating so machine noise hits all alike:

  http        httpx streaming GET from `python -m http.server` (its own process) to a file,
              no hashing: the anchor (the issue's 258 MB/s figure was this)
  http+sha    the same, hashing as it writes (what the installer does with an origin)
  peer        `MeshFileFetcher.fetch` in this process (a p2p node joined to the mesh) from
              one `mesh up` node, over the bulk side channel, verified (sha256 checked)
  2 peers     the same from two `mesh up` nodes at once (pieces from both)
  libp2p      one peer, every byte on libp2p streams (the old path), verified

Medians are reported with the ratios peer/http (target >= 0.8) and 2 peers/peer. On one
machine every process shares the same cores: two serving peers compete with each other
and with the client for CPU, which a LAN of separate machines would not.

    .venv/bin/python -m bench.gallery [--rounds 3] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from gallery.store import Store
from mesh.files import MeshFileFetcher, candidates
from mesh.p2p import open_p2p
from mesh.token import parse_token
from mesh.wire.state import NodeState
from tests.procs import MeshNode, models_dir, run_cli

CHUNK = 1 << 20
SETUPS = ("http", "http+sha", "peer", "2 peers", "libp2p")


def http_download(url: str, dest: Path, *, hash_it: bool) -> float:
    """Seconds to stream `url` into `dest` (hashing as it writes, like the installer)."""
    h = hashlib.sha256()
    t0 = time.perf_counter()
    with httpx.stream("GET", url, timeout=60) as r, open(dest, "wb") as fh:
        r.raise_for_status()
        for chunk in r.iter_bytes(CHUNK):
            fh.write(chunk)
            if hash_it:
                h.update(chunk)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def bench(args, work: Path, token: str, peer_addrs: list[str], url: str, sha: str,
                size: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in SETUPS}
    async with open_p2p(home=work / "client", token=parse_token(token), name="bench",
                        listen_host="127.0.0.1", p2p_port=0, peers=peer_addrs, mdns=False,
                        state=lambda: NodeState(name="bench")) as p2p:
        ok = await p2p.view.wait_for(lambda v: len(candidates(v, sha)) == len(peer_addrs), 30)
        if not ok:
            raise SystemExit("the serving nodes never advertised the file")
        fetchers = {"peer": MeshFileFetcher(p2p, max_sources=1),
                    "2 peers": MeshFileFetcher(p2p, max_sources=2),
                    "libp2p": MeshFileFetcher(p2p, max_sources=1, side_channel=False)}
        dest = work / "out.bin"
        for i in range(args.rounds):
            order = SETUPS if i % 2 == 0 else SETUPS[::-1]
            line = []
            for name in order:
                if name.startswith("http"):
                    t = await trio.to_thread.run_sync(
                        lambda: http_download(url, dest, hash_it=name == "http+sha"))
                else:
                    f = fetchers[name]
                    t0 = time.perf_counter()
                    if not await f.fetch(sha, size, dest, lambda n: None):
                        raise SystemExit(f"the {name} fetch failed (see the log above)")
                    t = time.perf_counter() - t0
                    assert f.verified == (sha, size)
                assert dest.stat().st_size == size
                dest.unlink()
                times[name].append(t)
                line.append(f"{name} {size / t / 1e6:.0f}")
            print(f"round {i + 1} (MB/s): " + ", ".join(line), flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    args = ap.parse_args()

    installed = Store(models_dir()).get(args.model)
    if installed is None:
        raise SystemExit(f"{args.model} is not installed in {models_dir()} (run the tests once)")
    f = max(installed.files, key=lambda x: x.size or 0)
    token = run_cli("token").stdout.strip()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as tmp:
        work = Path(tmp)
        server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                   str(port), "--directory", str(installed.dir)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes = [MeshNode(work / n, ["--name", n, "--no-models", "--no-mdns", "--token", token])
                 for n in ("seed-a", "seed-c")]
        try:
            addrs = []
            for node in nodes:
                node.start()
                addrs.append(node.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1))
                node.wait_ready(timeout=60)
            url = f"http://127.0.0.1:{port}/{f.path}"
            deadline = time.monotonic() + 10
            while True:                       # the HTTP server's socket is up
                try:
                    httpx.head(url, timeout=1).raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            print(f"file {f.path}: {f.size / 1e6:.1f} MB; {os.cpu_count()} CPUs, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            times = trio.run(bench, args, work, token, addrs, url, f.sha256, f.size)
        finally:
            for node in nodes:
                node.stop()
            server.terminate()
            server.wait()
    mbs = {k: f.size / statistics.median(v) / 1e6 for k, v in times.items()}
    best = {k: f.size / min(v) / 1e6 for k, v in times.items()}
    print("median MB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in mbs.items()))
    print("best MB/s:   " + ", ".join(f"{k} {v:.0f}" for k, v in best.items()))
    print(f"ratio peer/http {mbs['peer'] / mbs['http']:.2f} (target >= 0.8), "
          f"peer/http+sha {mbs['peer'] / mbs['http+sha']:.2f}, "
          f"2 peers/peer {mbs['2 peers'] / mbs['peer']:.2f}, "
          f"libp2p/http {mbs['libp2p'] / mbs['http']:.2f}")


if __name__ == "__main__":
    main()
