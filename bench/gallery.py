"""Peer fetch (/mesh/files/1) vs a plain HTTP download of the same model file, on loopback.

Same ~98 MB file (the installed SmolLM2 GGUF), same disk, in one run:
  anchor = httpx streaming GET from `python -m http.server` (its own process) to a file
  ours   = `MeshFileFetcher.fetch` in this process (a p2p node joined to the mesh) from a
           `mesh up` process serving the models directory, to a file
Rounds alternate between the two so that machine noise hits both alike; medians are
reported with the ratio ours/anchor (target: >= 0.5). Neither side hashes (the installer
does that after either).

    .venv/bin/python -m bench.gallery [--rounds 3]
"""

from __future__ import annotations

import argparse
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

MODEL = "smollm2-135m-instruct"
CHUNK = 1 << 20


def http_download(url: str, dest: Path) -> float:
    """Seconds to stream `url` into `dest`."""
    t0 = time.perf_counter()
    with httpx.stream("GET", url, timeout=60) as r, open(dest, "wb") as fh:
        r.raise_for_status()
        for chunk in r.iter_bytes(CHUNK):
            fh.write(chunk)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def bench(args, work: Path, token: str, peer_addr: str, url: str, sha: str,
                size: int) -> tuple[list[float], list[float]]:
    http_s: list[float] = []
    peer_s: list[float] = []
    async with open_p2p(home=work / "client", token=parse_token(token), name="bench",
                        listen_host="127.0.0.1", p2p_port=0, peers=[peer_addr], mdns=False,
                        state=lambda: NodeState(name="bench")) as p2p:
        ok = await p2p.view.wait_for(lambda v: bool(candidates(v, sha)), 20)
        if not ok:
            raise SystemExit("the serving node never advertised the file")
        fetcher = MeshFileFetcher(p2p)
        dest = work / "out.bin"
        for i in range(args.rounds):
            t = await trio.to_thread.run_sync(http_download, url, dest)
            assert dest.stat().st_size == size
            dest.unlink()
            http_s.append(t)
            t0 = time.perf_counter()
            if not await fetcher.fetch(sha, size, dest, lambda n: None):
                raise SystemExit("the peer fetch failed (see the log above)")
            t = time.perf_counter() - t0
            assert dest.stat().st_size == size
            dest.unlink()
            peer_s.append(t)
            print(f"round {i + 1}: http {size / http_s[-1] / 1e6:7.1f} MB/s   "
                  f"peer {size / peer_s[-1] / 1e6:7.1f} MB/s ({fetcher.source})", flush=True)
    return http_s, peer_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    installed = Store(models_dir()).get(MODEL)
    if installed is None:
        raise SystemExit(f"{MODEL} is not installed in {models_dir()} (run the tests once)")
    f = installed.files[0]
    path = installed.dir / f.path
    token = run_cli("token").stdout.strip()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as tmp:
        work = Path(tmp)
        server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                   str(port), "--directory", str(installed.dir)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        node = MeshNode(work / "node", ["--name", "seed", "--no-models", "--no-mdns",
                                        "--token", token])
        try:
            node.start()
            peer_addr = node.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
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
            http_s, peer_s = trio.run(bench, args, work, token, peer_addr, url, f.sha256, f.size)
        finally:
            node.stop()
            server.terminate()
            server.wait()
    http_mbs = f.size / statistics.median(http_s) / 1e6
    peer_mbs = f.size / statistics.median(peer_s) / 1e6
    print(f"median: http {http_mbs:.1f} MB/s, peer {peer_mbs:.1f} MB/s, "
          f"ratio peer/http {peer_mbs / http_mbs:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
