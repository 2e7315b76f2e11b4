"""Load: N concurrent streaming clients over a 3-node mesh on this machine.

Three real `mesh up` processes on 127.0.0.1 sharing a token, SmolLM2 on each, in their
default configuration (slots `auto`, queue_timeout 30 s). --clients threads each send
--requests streaming chat completions one after another (each its own prompt, greedy,
--tokens tokens), client i to node i % 3, through httpx as an OpenAI-compatible client
does. Every request ends as one of:
  completed   200, content, the stream's [DONE], no error event;
  clean 503   503 with Retry-After and OpenAI's error shape (load shedding);
  error       anything else: no byte for --timeout s (a client timeout), a request past
              --request-deadline s, another status, an error event mid-stream, a broken
              connection, a 503 without Retry-After.
The whole run is bounded (--clients x --requests requests, and --deadline s after which
the clients still running are counted as errors and abandoned).
Printed: the counts, p50/p95 of the latency (request start to the stream's end) and of
the TTFT (start to the first content piece) of completed requests, and each node's RSS
(the node process and its children: workers) after a warm-up request and after the load.
Target (issue 14): 0 errors at 120 clients (only completed or clean 503), RSS within 10%.

    .venv/bin/python -m bench.load [--clients 120] [--requests 2] [--tokens 32]
                                   [--timeout 120] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.procs import MeshNode, run_cli

MODEL = "smollm2-135m-instruct"
TOPICS = ["a lighthouse", "a dragon", "a lost robot", "two bakers", "a library", "a cat",
          "Mars", "a tree", "a clock", "a train", "a pirate", "the moon", "a violin", "a map",
          "snow", "inventors", "a bridge", "a comet", "a garden", "a river"]


# ------------------------------------------------------------------ the mesh
def start_mesh(root: Path) -> list[MeshNode]:
    token = run_cli("token").stdout.strip()
    env = {"MESH_TOKEN": token}
    first = MeshNode(root / "n0", ["--name", "n0", "--model", MODEL, "--no-mdns"], env=env).start()
    addr = first.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    nodes = [first] + [MeshNode(root / f"n{i}", ["--name", f"n{i}", "--model", MODEL,
                                                 "--no-mdns", "--peer", addr], env=env).start()
                       for i in (1, 2)]
    for n in nodes:
        n.wait_ready()
    deadline = time.monotonic() + 90
    for n in nodes:                    # every node sees all three serving
        while True:
            st = httpx.get(n.api + "/mesh/status", timeout=10).json()["nodes"]
            if sum(1 for x in st if x["state"] == "alive"
                   and any(m["id"] == MODEL and m["state"] == "loaded" for m in x["models"])) == 3:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench.load: the mesh never formed: {n.api} sees {st}")
            time.sleep(0.2)
    return nodes


def rss(nodes: list[MeshNode]) -> dict[str, int]:
    """Resident bytes per node: its process and all its children (workers)."""
    out = {}
    for n in nodes:
        p = psutil.Process(n.proc.pid)
        total = 0
        for q in [p, *p.children(recursive=True)]:
            try:
                total += q.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        out[n.args[n.args.index("--name") + 1]] = total
    return out


# ------------------------------------------------------------------ one request
def one(http: httpx.Client, url: str, prompt: str, tokens: int, deadline_s: float) -> dict:
    t0 = time.monotonic()
    res = {"kind": "error", "latency": None, "ttft": None, "why": ""}
    body = {"model": MODEL, "stream": True, "max_tokens": tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}
    try:
        with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                r.read()
                try:
                    err = r.json().get("error") or {}
                except ValueError:
                    err = {}
                if r.status_code == 503 and r.headers.get("retry-after") and err.get("message"):
                    res["kind"] = "503"
                else:
                    res["why"] = f"status {r.status_code}: {r.text[:120]}"
                return res
            done, content = False, False
            for line in r.iter_lines():
                if time.monotonic() - t0 > deadline_s:
                    res["why"] = f"past the {deadline_s:.0f} s request deadline"
                    return res
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if ev.get("error"):
                    res["why"] = f"error event: {ev['error'].get('message', ev['error'])}"
                    return res
                for c in ev.get("choices") or []:
                    if (c.get("delta") or {}).get("content"):
                        if res["ttft"] is None:
                            res["ttft"] = time.monotonic() - t0
                        content = True
            if not done:
                res["why"] = "the stream ended without [DONE]"
            elif not content:
                res["why"] = "no content"
            else:
                res["kind"], res["latency"] = "completed", time.monotonic() - t0
    except httpx.TimeoutException as exc:
        res["why"] = f"client timeout ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        res["why"] = f"{type(exc).__name__}: {exc}"
    return res


def client(i: int, urls: list[str], args, results: list, lock: threading.Lock) -> None:
    url = urls[i % len(urls)]
    with httpx.Client(timeout=httpx.Timeout(args.timeout, connect=30)) as http:
        for k in range(args.requests):
            topic = TOPICS[(i + k) % len(TOPICS)]
            r = one(http, url, f"Client {i}, request {k}: write two sentences about {topic}.",
                    args.tokens, args.request_deadline)
            with lock:
                results.append(r)


# ------------------------------------------------------------------ figures
def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=120)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, in turn")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="client timeout: s without a byte before a request is an error")
    ap.add_argument("--request-deadline", type=float, default=300.0,
                    help="s a request may take in all before it is an error")
    ap.add_argument("--deadline", type=float, default=900.0,
                    help="s for the whole load; clients still running then are errors")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    for name in ("clients", "requests", "tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        nodes = start_mesh(Path(tmp))
        try:
            with httpx.Client(timeout=120) as http:   # warm: each worker has run a request
                for n in nodes:
                    one(http, n.v1 + "/chat/completions", "Say hi.", 8, 120)
            before = rss(nodes)
            urls = [n.v1 + "/chat/completions" for n in nodes]
            results: list[dict] = []
            lock = threading.Lock()
            threads = [threading.Thread(target=client, args=(i, urls, args, results, lock),
                                        daemon=True) for i in range(args.clients)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            end = t0 + args.deadline
            for t in threads:
                t.join(timeout=max(0.0, end - time.monotonic()))
            wall = time.monotonic() - t0
            with lock:
                results = list(results)
            missing = args.clients * args.requests - len(results)
            results += [{"kind": "error", "latency": None, "ttft": None,
                         "why": f"still running at the {args.deadline:.0f} s deadline"}] * missing
            after = rss(nodes)
        finally:
            for n in nodes:
                n.stop()

    lat = [r["latency"] for r in results if r["kind"] == "completed"]
    ttft = [r["ttft"] for r in results if r["kind"] == "completed"]
    whys: dict[str, int] = {}
    for r in results:
        if r["kind"] == "error":
            key = r["why"].split(":")[0] if r["why"].startswith("status") else r["why"][:80]
            whys[key] = whys.get(key, 0) + 1
    out = {
        "clients": args.clients, "requests_per_client": args.requests, "tokens": args.tokens,
        "wall_s": round(wall, 1),
        "completed": sum(r["kind"] == "completed" for r in results),
        "clean_503": sum(r["kind"] == "503" for r in results),
        "errors": sum(r["kind"] == "error" for r in results), "error_kinds": whys,
        "latency_s": {"p50": pct(lat, 50), "p95": pct(lat, 95)},
        "ttft_s": {"p50": pct(ttft, 50), "p95": pct(ttft, 95)},
        "rss_before": before, "rss_after": after,
        "rss_growth": {k: after[k] / before[k] - 1 for k in before},
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        def s(x):
            return "-" if x is None else f"{x:.2f} s"
        print(f"{args.clients} clients x {args.requests} requests ({args.tokens} tokens) over 3 "
              f"nodes in {out['wall_s']} s")
        print(f"completed {out['completed']}, clean 503 {out['clean_503']}, "
              f"errors {out['errors']}" + (f" {whys}" if whys else ""))
        print(f"latency p50 {s(out['latency_s']['p50'])}, p95 {s(out['latency_s']['p95'])}; "
              f"TTFT p50 {s(out['ttft_s']['p50'])}, p95 {s(out['ttft_s']['p95'])}")
        for k in before:
            print(f"RSS {k}: {before[k] / 2**20:.0f} MiB -> {after[k] / 2**20:.0f} MiB "
                  f"({out['rss_growth'][k]:+.1%})")
        ok = out["errors"] == 0 and all(abs(g) <= 0.10 for g in out["rss_growth"].values())
        print(f"target (0 errors, RSS within 10%): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
