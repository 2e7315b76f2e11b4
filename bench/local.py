"""Decode speed and time-to-first-token: the node's HTTP API vs llama-cpp-python in-process.

Same model file, same prompt, same threads, greedy, same max_tokens, in one run:
  anchor = `Llama.create_chat_completion(stream=True)` called in this process
  ours   = `mesh up` (a real node process) through the official openai client, streaming
Rounds alternate between the two so that machine noise hits both alike; medians are
reported with the ratio ours/anchor (target: decode >= 0.95, TTFT +5 ms at most).
Decode counts tokens (usage), not chunks: a paced stream carries several per chunk.

    .venv/bin/python -m bench.local [--rounds 5] [--tokens 128] [--stream-interval-ms 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import openai

from gallery.store import Store
from tests.procs import MeshNode, models_dir, models_with

MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def measure(stream_iter) -> tuple[float, float, int]:
    """(ttft s, decode tokens/s, tokens) from an iterator of (text, usage) pairs; without
    usage, every chunk with text counts as one token (llama-cpp-python's stream)."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    usage_tokens = None
    for text, usage in stream_iter:
        now = time.perf_counter()
        if text:
            n += 1
            first = first or now
            last = now
        if usage:
            usage_tokens = usage
    tokens = usage_tokens or n
    # tokens after the first over the time from the first text to the last: a chunk may
    # carry several tokens (a paced stream, node/backends/batching.py), so count tokens
    # (usage), not chunks; the first chunk is one token (pacing never holds the first)
    decode = (tokens - 1) / (last - first) if tokens > 1 and n > 1 and last > first else 0.0
    return (first - t0) if first else float("nan"), decode, tokens


def in_process(llm, tokens: int):
    for chunk in llm.create_chat_completion(PROMPT, max_tokens=tokens, temperature=0,
                                            stream=True):
        yield chunk["choices"][0]["delta"].get("content"), None


def over_http(client, tokens: int):
    for chunk in client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=tokens,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        text = chunk.choices[0].delta.content if chunk.choices else None
        yield text, (chunk.usage.completion_tokens if chunk.usage else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--stream-interval-ms", type=float, default=None,
                    help="the node's stream_interval_ms (default: the model's own, 20)")
    args = ap.parse_args()

    from llama_cpp import Llama
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as home:
        extra = ([] if args.stream_interval_ms is None else ["--models-dir", str(models_with(
            Path(home), MODEL, {"stream_interval_ms": args.stream_interval_ms}))])
        node = MeshNode(Path(home) / "node", ["--model", MODEL, "--no-mdns", *extra]).start().wait_ready()
        try:
            installed = Store(models_dir()).get(MODEL)
            llm = Llama(str(installed.path), n_ctx=2048, n_threads=threads,
                        n_threads_batch=threads, flash_attn=True, verbose=False)
            client = openai.OpenAI(base_url=node.v1, api_key="x", max_retries=0)
            # warm-up both
            measure(in_process(llm, 8))
            measure(over_http(client, 8))
            res: dict[str, list[tuple[float, float, int]]] = {"in-process": [], "http": []}
            for _ in range(args.rounds):
                res["in-process"].append(measure(in_process(llm, args.tokens)))
                res["http"].append(measure(over_http(client, args.tokens)))
        finally:
            node.stop()
    med = {k: (statistics.median(r[0] for r in v) * 1000, statistics.median(r[1] for r in v),
               statistics.median(r[2] for r in v)) for k, v in res.items()}
    print(f"model {MODEL}, {threads} threads, {args.rounds} rounds of {args.tokens} tokens, "
          f"stream_interval_ms {'default' if args.stream_interval_ms is None else args.stream_interval_ms}")
    print(f"{'path':<12}{'TTFT ms':>10}{'decode tok/s':>15}{'tokens':>8}")
    for k, (ttft, dec, n) in med.items():
        print(f"{k:<12}{ttft:>10.1f}{dec:>15.1f}{n:>8.0f}")
    a, o = med["in-process"], med["http"]
    print(f"ratio http/in-process: decode {o[1] / a[1]:.3f}, TTFT {o[0] / a[0]:.2f}x "
          f"(+{o[0] - a[0]:.1f} ms)")


if __name__ == "__main__":
    main()
