"""Prefix-affine routing vs least-busy: the time to first token of a conversation's later turns.

One run, two meshes of three real nodes each on 127.0.0.1 (SmolLM2 on every node, all on
this machine's cores): in one, MESH_AFFINITY=1 (the default), in the other MESH_AFFINITY=0 (the
router as before: local while it has a free slot, else the least busy). Each round drives
one mesh, then the other (alternating which goes first): 12 conversations at once, each
6 turns with a growing history (a ~170-token system prompt, 48-token answers), every turn
sent to a random node of that mesh (the same random choices in both meshes); --concurrent
of them at a time (default all). Printed:
median TTFT of turns 2-6 (and turn 1), the share of later turns that found their prefix
cached, and the aggregate completion tokens/s, per mesh and as a ratio; medians over all
turns of all rounds.

    .venv/bin/python -m bench.affinity [--rounds 3] [--conversations 12] [--turns 6]
                                       [--concurrent 12]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import openai

from tests.procs import MeshNode, run_cli

MODEL = "smollm2-135m-instruct"
SYSTEM = ("You are a careful assistant for a team that runs many machines on a local "
          "network. Keep every answer short and concrete, and never use lists. ") * 4
QUESTIONS = ["What is {t}?", "Why does it matter?", "How would I set it up?",
             "What can go wrong?", "How do I check it works?", "Summarise in a line."]
TOPICS = ["a mesh network", "a load balancer", "a key ring", "gossip", "a token bucket",
          "a prefix cache", "mDNS", "a RPC split", "a batch job", "a heartbeat",
          "an API key", "a KV cache", "a chat template", "a router", "a slot"]


def start_mesh(root: Path, tag: str, affinity: bool) -> list[MeshNode]:
    token = run_cli("token").stdout.strip()
    env = {"MESH_TOKEN": token, "MESH_AFFINITY": "1" if affinity else "0"}
    first = MeshNode(root / f"{tag}0", ["--name", f"{tag}0", "--model", MODEL, "--no-mdns"],
                     env=env).start()
    addr = first.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    nodes = [first] + [MeshNode(root / f"{tag}{i}", ["--name", f"{tag}{i}", "--model", MODEL,
                                                     "--no-mdns", "--peer", addr], env=env).start()
                       for i in (1, 2)]
    for n in nodes:
        n.wait_ready()
    for n in nodes:                    # every node sees the other two serving
        c = openai.OpenAI(base_url=n.v1, api_key="x", max_retries=0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = httpx.get(n.api + "/mesh/status", timeout=5).json()["nodes"]
            if sum(1 for x in st if x["state"] == "alive" and x["models"]) == 3:
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"{n.args[n.args.index('--name') + 1]} never saw 3 serving nodes")
        c.chat.completions.create(model=MODEL, max_tokens=2,
                                  messages=[{"role": "user", "content": "hi"}])
    return nodes


def conversation(nodes: list[MeshNode], topic: str, turns: int, tokens: int,
                 rng: random.Random) -> list[dict]:
    clients = [openai.OpenAI(base_url=n.v1, api_key="x", max_retries=0, timeout=300)
               for n in nodes]
    msgs = [{"role": "system", "content": SYSTEM}]
    out = []
    for turn in range(turns):
        msgs.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)].format(t=topic)})
        entry = rng.randrange(len(nodes))
        t0 = time.perf_counter()
        ttft, text, usage = None, [], None
        raw = clients[entry].chat.completions.with_raw_response.create(
            model=MODEL, messages=msgs, max_tokens=tokens, temperature=0, seed=1,
            stream=True, stream_options={"include_usage": True})
        node = raw.headers.get("x-mesh-node")
        for ev in raw.parse():
            if ev.choices and ev.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(ev.choices[0].delta.content)
            if ev.usage:
                usage = ev.usage
        msgs.append({"role": "assistant", "content": "".join(text)})
        cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0
        out.append({"turn": turn, "ttft": ttft if ttft is not None else time.perf_counter() - t0,
                    "prompt": usage.prompt_tokens, "cached": cached,
                    "completion": usage.completion_tokens, "node": node})
    return out


def drive(nodes, args, seed: int) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(args.concurrent or args.conversations) as pool:
        futs = [pool.submit(conversation, nodes, TOPICS[i % len(TOPICS)], args.turns, args.tokens,
                            random.Random(seed * 1000 + i)) for i in range(args.conversations)]
        turns = [t for f in futs for t in f.result()]
    wall = time.perf_counter() - t0
    return {"turns": turns, "wall": wall, "tokens": sum(t["completion"] for t in turns)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--concurrent", type=int, default=0, help="conversations at a time (0: all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        meshes = {"affinity": start_mesh(Path(tmp), "p", True),
                  "least-busy": start_mesh(Path(tmp), "l", False)}
        res = {k: [] for k in meshes}
        try:
            for r in range(args.rounds):
                order = list(meshes) if r % 2 == 0 else list(reversed(meshes))
                for k in order:
                    res[k].append(drive(meshes[k], args, seed=r))
                    print(f"round {r + 1} {k}: {res[k][-1]['wall']:.1f} s", flush=True)
            for k, ns in meshes.items():      # why the requests went where they did
                routes: dict[str, int] = {}
                for n in ns:
                    got = httpx.get(n.api + "/mesh/status", timeout=10).json()["self"]["routes"]
                    for r, c in got.items():
                        routes[r] = routes.get(r, 0) + c
                print(f"{k} routes: {routes}")
        finally:
            for ns in meshes.values():
                for n in ns:
                    n.stop()
    summary = {}
    for k, rounds in res.items():
        later = [t for rr in rounds for t in rr["turns"] if t["turn"] > 0]
        first = [t for rr in rounds for t in rr["turns"] if t["turn"] == 0]
        summary[k] = {
            "ttft_later": statistics.median(t["ttft"] for t in later),
            "ttft_first": statistics.median(t["ttft"] for t in first),
            "hit": sum(1 for t in later if t["cached"] > t["prompt"] // 2) / len(later),
            "cached_share": sum(t["cached"] for t in later) / sum(t["prompt"] for t in later),
            "tok_s": statistics.median(rr["tokens"] / rr["wall"] for rr in rounds)}
    print(f"\n{args.rounds} rounds x {args.conversations} conversations "
          f"({args.concurrent or args.conversations} at a time) x {args.turns} turns, "
          f"{args.tokens}-token answers; medians")
    print(f"{'':12} {'TTFT 2-6':>10} {'TTFT 1':>9} {'cached':>8} {'hits':>6} {'tok/s':>8}")
    for k, s in summary.items():
        print(f"{k:12} {s['ttft_later'] * 1000:8.0f}ms {s['ttft_first'] * 1000:7.0f}ms "
              f"{s['cached_share']:8.0%} {s['hit']:6.0%} {s['tok_s']:8.1f}")
    a, b = summary["affinity"], summary["least-busy"]
    print(f"least-busy/affinity TTFT (turns 2-6): {b['ttft_later'] / a['ttft_later']:.2f}x "
          f"(target >= 2); throughput affinity/least-busy: {a['tok_s'] / b['tok_s']:.2f} "
          f"(must not drop)")


if __name__ == "__main__":
    main()
