"""Paced streams (node/backends/batching.py design note "Pacing"): a stream's text goes
out at most every `stream_interval_ms`, the first token at once, held text before any
step that reads a prompt; 0 sends every token as it comes.

Two real nodes serve SmolLM2 from models dirs of their own whose model.yaml sets
`stream_interval_ms` (1000 and 0); the client is the official `openai` SDK. Logprobs
say how many tokens each chunk carries.
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import openai
import pytest

from gallery.store import Store
from tests.procs import MeshNode, models_dir, models_with

CHAT = "smollm2-135m-instruct"
TOKENS = 32
NO_EOS = {"0": -100, "2": -100}   # <|endoftext|>, <|im_end|>: such a stream runs to max_tokens
PREFILL_CHUNK = 128               # docs/architecture.md: prompt tokens per step while others stream
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def paced_node(tmp, interval_ms: float) -> MeshNode:
    """A node whose SmolLM2 has `stream_interval_ms: interval_ms` in its model.yaml."""
    if Store(models_dir()).get(CHAT) is None:     # not installed yet: a node installs it
        MeshNode(tmp / "install", ["--model", CHAT, "--no-mdns"]).start().wait_ready().stop()
    models = models_with(tmp, CHAT, {"stream_interval_ms": interval_ms})
    return MeshNode(tmp / "home", ["--model", CHAT, "--no-mdns", "--models-dir", str(models)]).start()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    started = []
    try:
        for ms in (1000, 0):
            started.append(paced_node(tmp_path_factory.mktemp(f"paced{ms}"), ms))
        for n in started:
            n.wait_ready()
        yield {1000: started[0], 0: started[1]}
    finally:
        for n in started:
            n.stop()


def client(node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=300)


def chunks(node, max_tokens=TOKENS) -> tuple[list[int], str, int]:
    """Tokens per content chunk (from its logprobs), the text, usage's completion tokens."""
    sizes, text, usage = [], "", None
    for chunk in client(node).chat.completions.create(
            model=CHAT, messages=MESSAGES, max_tokens=max_tokens, temperature=0,
            logprobs=True, logit_bias=NO_EOS, stream=True,
            stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.delta.content:
                sizes.append(len(c.logprobs.content))
                text += c.delta.content
    return sizes, text, usage.completion_tokens


def test_a_paced_stream_sends_its_first_token_alone_then_joins_the_rest(nodes):
    sizes, text, n = chunks(nodes[1000])
    plain = client(nodes[1000]).chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=TOKENS, temperature=0, logit_bias=NO_EOS)
    assert n == TOKENS and sum(sizes) == TOKENS, (sizes, n)
    assert sizes[0] == 1, sizes          # time to first token is not paced
    # 32 tokens of SmolLM2 take well under the 1 s interval here: the rest is one chunk
    # (two if this machine is slow enough for the interval to end mid-answer)
    assert len(sizes) <= 3, sizes
    assert text == plain.choices[0].message.content


def test_interval_zero_sends_every_token_as_it_comes(nodes):
    sizes, text, n = chunks(nodes[0])
    assert sum(sizes) == n == TOKENS
    assert text == chunks(nodes[1000])[1]            # pacing changes chunks, not text
    # the node joins only what piled up while it was busy: almost every token is its own
    assert len(sizes) >= TOKENS // 2, sizes


def test_held_text_goes_out_before_a_step_that_reads_a_prompt(nodes):
    """Within the 1 s interval the running stream's text is held, but a step that reads
    a long prompt (PREFILL_CHUNK tokens each) may take long, so before each one the held
    text is sent: the running stream receives a chunk at each of those steps."""
    c = client(nodes[1000])
    arrivals: list[float] = []
    started, stop = threading.Event(), threading.Event()
    errors: list[Exception] = []

    def run():
        try:
            with c.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": "Write a long story."}],
                    max_tokens=1500, temperature=0, logit_bias=NO_EOS, stream=True) as s:
                for chunk in s:
                    if chunk.choices and chunk.choices[0].delta.content:
                        arrivals.append(time.monotonic())
                        started.set()
                    if stop.is_set():
                        break
        except Exception as exc:       # re-raised by the test below
            errors.append(exc)
        finally:
            started.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(120)
    prompt = f"{uuid.uuid4().hex} " + "The quick brown fox jumps over the lazy dog. " * 130
    try:
        sent = time.monotonic()
        first, usage = None, None
        for chunk in c.completions.create(model=CHAT, prompt=prompt, max_tokens=2,
                                          temperature=0, stream=True,
                                          stream_options={"include_usage": True}):
            if first is None and chunk.choices:
                first = time.monotonic()
            usage = chunk.usage or usage
    finally:
        stop.set()
    t.join(120)
    if errors:
        raise errors[0]
    steps = math.ceil(usage.prompt_tokens / PREFILL_CHUNK)
    assert usage.prompt_tokens > 4 * PREFILL_CHUNK, usage
    during = [a for a in arrivals if sent < a < first]
    assert len(during) >= steps - 1, (len(during), steps, first - sent)
