"""The cost of a proxy hop, and how fast gossip converges.

One run, two real nodes on 127.0.0.1 with one token: A serves SmolLM2, B serves nothing.
  direct   = streaming chat to A
  proxied  = the same request to B, which relays it to A over /mesh/openai/2 (typed request and
             events; the events on A's bulk side channel, or on the libp2p stream with
             --no-side-channel)
Rounds alternate direct/proxied; medians of time-to-first-token and decode tokens/s are
printed with the ratio proxied/direct. Then gossip convergence: A loads a second model
(`mesh load`) and we time until B's /v1/models lists it (and unload -> gone).

    .venv/bin/python -m bench.mesh [--rounds 5] [--tokens 128] [--stream-interval-ms 0]
                                   [--no-side-channel]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import openai

from bench.local import MODEL, measure, over_http
from tests.procs import MeshNode, models_with, run_cli


def until(pred, timeout=30.0) -> float:
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout:
            return float("nan")
        time.sleep(0.005)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--stream-interval-ms", type=float, default=None,
                    help="A's stream_interval_ms (default: the model's own, 20)")
    ap.add_argument("--no-side-channel", action="store_true",
                    help="A with MESH_BULK_PORT=-1: proxied events stay on the libp2p stream")
    args = ap.parse_args()
    token = run_cli("token").stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        extra = ([] if args.stream_interval_ms is None else ["--models-dir", str(models_with(
            Path(tmp), MODEL, {"stream_interval_ms": args.stream_interval_ms}))])
        a = MeshNode(Path(tmp) / "a", ["--name", "a", "--model", MODEL, "--no-mdns", *extra],
                     env={"MESH_TOKEN": token,
                          **({"MESH_BULK_PORT": "-1"} if args.no_side_channel else {})}).start()
        addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
        a.wait_ready()
        b = MeshNode(Path(tmp) / "b", ["--name", "b", "--no-models", "--no-mdns", "--peer", addr],
                     env={"MESH_TOKEN": token}).start().wait_ready()
        try:
            direct = openai.OpenAI(base_url=a.v1, api_key="x", max_retries=0)
            proxied = openai.OpenAI(base_url=b.v1, api_key="x", max_retries=0)
            until(lambda: MODEL in {m.id for m in proxied.models.list().data})
            measure(over_http(direct, 8))
            measure(over_http(proxied, 8))
            res = {"direct": [], "proxied": []}
            for _ in range(args.rounds):
                res["direct"].append(measure(over_http(direct, args.tokens)))
                res["proxied"].append(measure(over_http(proxied, args.tokens)))

            # gossip convergence: a load on A seen by B
            def listed(m):
                return m in {x["id"] for x in httpx.get(b.v1 + "/models").json()["data"]}
            conv = []
            for _ in range(3):
                httpx.post(a.api + "/mesh/models/unload", json={"id": MODEL}, timeout=30)
                until(lambda: not listed(MODEL))
                t0 = time.perf_counter()
                httpx.post(a.api + "/mesh/models/load", json={"id": MODEL}, timeout=120)
                loaded = time.perf_counter()
                until(lambda: listed(MODEL))
                conv.append((time.perf_counter() - loaded) * 1000)
        finally:
            b.stop()
            a.stop()
    med = {k: (statistics.median(r[0] for r in v) * 1000, statistics.median(r[1] for r in v))
           for k, v in res.items()}
    print(f"model {MODEL}, {args.rounds} rounds of {args.tokens} tokens, streaming, "
          f"stream_interval_ms {'default' if args.stream_interval_ms is None else args.stream_interval_ms}, "
          f"proxied events on {'the libp2p stream' if args.no_side_channel else 'the side channel'}")
    print(f"{'path':<10}{'TTFT ms':>10}{'decode tok/s':>15}")
    for k, (ttft, dec) in med.items():
        print(f"{k:<10}{ttft:>10.1f}{dec:>15.1f}")
    d, p = med["direct"], med["proxied"]
    print(f"ratio proxied/direct: decode {p[1] / d[1]:.3f}, TTFT {p[0] / d[0]:.2f}x (+{p[0] - d[0]:.1f} ms)")
    print(f"gossip convergence (load on A -> listed by B): median {statistics.median(conv):.0f} ms "
          f"over {len(conv)} loads ({', '.join(f'{c:.0f}' for c in conv)} ms)")


if __name__ == "__main__":
    main()
