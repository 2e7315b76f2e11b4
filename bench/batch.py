"""The Batch API over one serving node vs two, and what a batch costs an interactive user.

Two 1-core machines, modelled on this one: every node runs pinned to one CPU with
`taskset` (the backends then use one thread: node/backends/llama.py uses the CPUs the
process may run on). Three nodes serve SmolLM2:
    solo     CPU 0, alone (no token)
    pair-a   CPU 0 \\ one mesh (a shared token); the batch is submitted to pair-a,
    pair-b   CPU 1 /  which spreads its lines over both
Rounds alternate solo / pair. Per round: the wall time of an N-line batch
(files.create -> batches.create -> completed, polled every 0.2 s), and the time to first
token of a streaming chat sent to the entry node while it is idle (5, after a warm-up)
and while the batch runs (5, at 30%, 40% ... 70% of its lines). Printed: medians over
rounds (TTFT: over every sample), and the ratios
    speed-up     = solo batch time / pair batch time            (target >= 1.7)
    TTFT cost    = TTFT during the batch / TTFT idle, on pair-a  (target <= 1.5)

    .venv/bin/python -m bench.batch [--rounds 3] [--lines 200] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import openai

from tests.procs import MeshNode, run_cli

MODEL = "smollm2-135m-instruct"
POLL_S = 0.2
DURING = 5          # interactive requests per batch, at 30%, 40%, ... 70% of its lines


def lines(n: int, tokens: int) -> bytes:
    return "".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "max_tokens": tokens, "temperature": 0,
                 "messages": [{"role": "user", "content": f"Write a line about the number {i}."}]}})
        + "\n" for i in range(n)).encode()


def ttft(client: openai.OpenAI) -> float:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL, stream=True, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Say hello."}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            dt = time.perf_counter() - t0
            stream.close()
            return dt
    raise RuntimeError("no token came back")


def run_batch(client: openai.OpenAI, data: bytes) -> tuple[float, list[float]]:
    """(wall time of the batch, TTFTs measured while it ran)"""
    f = client.files.create(file=("bench.jsonl", data), purpose="batch")
    t0 = time.perf_counter()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    during: list[float] = []
    while b.status not in ("completed", "failed", "cancelled", "expired"):
        c = b.request_counts
        if c.total and len(during) < DURING and c.completed >= (0.3 + 0.1 * len(during)) * c.total:
            during.append(ttft(client))
        time.sleep(POLL_S)
        b = client.batches.retrieve(b.id)
    wall = time.perf_counter() - t0
    if b.status != "completed" or b.request_counts.completed != b.request_counts.total:
        raise RuntimeError(f"batch ended {b.status}: {b.request_counts}")
    return wall, during


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 CPUs (one per modelled machine)")
    data = lines(args.lines, args.tokens)
    token = run_cli("token").stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--model", MODEL, "--no-mdns"]
        solo = MeshNode(Path(tmp) / "solo", ["--name", "solo", *common],
                        prefix=["taskset", "-c", "0"]).start()
        a = MeshNode(Path(tmp) / "a", ["--name", "pair-a", *common], env={"MESH_TOKEN": token},
                     prefix=["taskset", "-c", "0"]).start()
        addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
        b = MeshNode(Path(tmp) / "b", ["--name", "pair-b", *common, "--peer", addr],
                     env={"MESH_TOKEN": token}, prefix=["taskset", "-c", "1"]).start()
        try:
            for n in (solo, a, b):
                n.wait_ready()
            clients = {name: openai.OpenAI(base_url=n.v1, api_key="unused", max_retries=0,
                                           timeout=600) for name, n in (("solo", solo), ("pair", a))}
            walls: dict[str, list[float]] = {"solo": [], "pair": []}
            idle, busy = [], []
            for r in range(args.rounds):
                for name in (("solo", "pair") if r % 2 == 0 else ("pair", "solo")):
                    c = clients[name]
                    if name == "pair":
                        ttft(c)                                     # warm
                        idle.extend(ttft(c) for _ in range(DURING))
                    wall, during = run_batch(c, data)
                    walls[name].append(wall)
                    if name == "pair":
                        busy.extend(during)
                    print(f"round {r + 1} {name:4}: {args.lines} lines in {wall:6.1f} s"
                          + (f", TTFT idle {statistics.median(idle[-DURING:]) * 1000:.0f} ms, "
                             f"during {' '.join(f'{x * 1000:.0f}' for x in during)} ms"
                             if name == "pair" and during else ""),
                          flush=True)
        finally:
            for n in (b, a, solo):
                n.stop()
    s, p = statistics.median(walls["solo"]), statistics.median(walls["pair"])
    ti, tb = statistics.median(idle), statistics.median(busy)
    print(f"\nmedians over {args.rounds} rounds ({args.lines} lines x {args.tokens} tokens):")
    print(f"  1 node  {s:7.1f} s   ({args.lines * args.tokens / s:6.1f} tokens/s)")
    print(f"  2 nodes {p:7.1f} s   ({args.lines * args.tokens / p:6.1f} tokens/s)")
    print(f"  speed-up 2 nodes / 1 node: {s / p:.2f}x   (target >= 1.7)")
    print(f"  interactive TTFT on the entry node: idle {ti * 1000:.0f} ms, during the batch "
          f"{tb * 1000:.0f} ms, ratio {tb / ti:.2f}   (target <= 1.5)")


if __name__ == "__main__":
    main()
