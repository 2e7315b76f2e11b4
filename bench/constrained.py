"""Constrained decoding under load: 8 json_schema streams vs 8 free streams, ours vs llama-server.

One run, the same GGUF, the same threads, greedy, the same prompts (bench/concurrency.py's
story prompts), closed-loop clients:
  mesh-free     `mesh up` (continuous batching, parallel 8), no constraint
  mesh-json     the same node, every request with response_format json_schema
                {title: string <= 40 chars, story: string} (the story runs to max_tokens,
                so both workloads generate about the same number of tokens)
  server-json   llama.cpp's own llama-server (--parallel 8), the same json_schema
  server-free   llama-server without a constraint, for reference
Aggregate tokens/s = completion tokens / wall time of a trial. Trials rotate the servers
(--repeat times each) and the table keeps each one's best trial (one-sided noise on a
shared machine). Targets: mesh-json >= 0.8 x mesh-free and mesh-json >= server-json.

    .venv/bin/python -m bench.constrained [--clients 8] [--rounds 2] [--tokens 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import openai

from bench.concurrency import (GOMP_SPINCOUNT, MODEL, build_llama_server, level,
                               mesh_models_dir, start_llama_server)
from gallery.store import Store
from tests.procs import MeshNode, models_dir

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "story": {"type": "string"}},
          "required": ["title", "story"], "additionalProperties": False}


def stream_for(base_url: str, constrained: bool):
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
    extra = ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "story", "schema": SCHEMA, "strict": True}}} if constrained else {})

    def stream(messages, tokens):
        for chunk in client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, **extra):
            text = chunk.choices[0].delta.content if chunk.choices else None
            yield text, (chunk.usage.completion_tokens if chunk.usage else None)
    return stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
    threads = os.cpu_count() or 1
    installed = Store(models_dir()).get(MODEL)
    if installed is None:
        sys.exit(f"{MODEL} is not installed in {models_dir()}")
    servers, notes, procs = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MESH_TEST_MODELS_DIR"] = str(mesh_models_dir(tmp))
        node = MeshNode(tmp / "home", ["--model", MODEL, "--no-mdns"]).start().wait_ready()
        try:
            servers["mesh-free"] = stream_for(node.v1, False)
            servers["mesh-json"] = stream_for(node.v1, True)
            exe = build_llama_server()
            if isinstance(exe, str):
                notes.append(f"llama-server skipped: {exe}")
            else:
                proc, url = start_llama_server(exe, str(installed.path), threads, tmp / "server.log")
                procs.append(proc)
                servers["server-json"] = stream_for(url, True)
                servers["server-free"] = stream_for(url, False)
            for name, s in servers.items():          # warm-up, and a validity check
                out = "".join(t or "" for t, _ in s([{"role": "user", "content": "Hi"}], 48))
                if name.endswith("json") and out.count('"story"') != 1:
                    notes.append(f"{name}: warm-up output does not look constrained: {out[:60]!r}")
            best: dict[str, dict] = {}
            names = list(servers)
            salt = 0
            for rep in range(args.repeat):
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    salt += 1000
                    r = level(servers[name], args.clients, args.rounds, args.tokens, salt=salt)
                    print(f"  {name:<12} {r['tok_s']:7.1f} tok/s  TTFT p50 {r['p50']:6.0f} ms "
                          f"({r['tokens']} tokens in {r['wall']:.1f} s)", flush=True)
                    if name not in best or r["tok_s"] > best[name]["tok_s"]:
                        best[name] = r
        finally:
            node.stop()
            for p in procs:
                p.kill()
    print(f"\nmodel {MODEL}, {args.clients} clients x {args.rounds} requests, max_tokens "
          f"{args.tokens}, greedy, best of {args.repeat} trials")
    for name, r in best.items():
        print(f"{name:<12}{r['tok_s']:>9.1f} tok/s")
    free, js = best["mesh-free"]["tok_s"], best["mesh-json"]["tok_s"]
    print(f"mesh-json / mesh-free: {js / free:.2f} (target >= 0.8)")
    if "server-json" in best:
        print(f"mesh-json / server-json: {js / best['server-json']['tok_s']:.2f} (target >= 1.0)")
        print(f"server-json / server-free: "
              f"{best['server-json']['tok_s'] / best['server-free']['tok_s']:.2f}")
    for n in notes:
        print(n)
    print(json.dumps({k: round(v["tok_s"], 1) for k, v in best.items()}))


if __name__ == "__main__":
    main()
