"""Continuous batching in the llama worker (node/backends/batching.py).

Product-level tests drive a real node through the official `openai` client; the
smollm2 gallery entry runs 4 slots. Greedy decoding makes "the same text as alone" exact.
The text-stream unit tests at the end need no model.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from node.backends.batching import TextStream, common_prefix
from tests.procs import MeshNode

CHAT = "smollm2-135m-instruct"
TOKENS = 32
QUESTIONS = ["Write a short poem about the sea.", "What is the capital of France?",
             "Explain photosynthesis in two sentences.", "Tell me a joke about cats."]


def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = MeshNode(tmp_path_factory.mktemp("batching"), ["--model", CHAT, "--no-mdns"]).start()
    try:
        n.wait_ready()
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=300)


def worker(node) -> dict:
    me = httpx.get(node.api + "/mesh/status", timeout=10).json()["nodes"][0]
    return next(m for m in me["models"] if m["id"] == CHAT)


def alone(client, messages, max_tokens=TOKENS):
    r = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=max_tokens,
                                       temperature=0)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


class Stream(threading.Thread):
    """One streaming chat request on its own thread; `stop_after` closes it early."""

    def __init__(self, client, messages, *, max_tokens=TOKENS, stop_after=None):
        super().__init__(daemon=True)
        self.client, self.messages = client, messages
        self.max_tokens, self.stop_after = max_tokens, stop_after
        self.text, self.finish, self.usage, self.error = "", None, None, None
        self.first = threading.Event()
        self.t_start = self.t_end = None

    def run(self):
        self.t_start = time.monotonic()
        try:
            with self.client.chat.completions.create(
                    model=CHAT, messages=self.messages, max_tokens=self.max_tokens,
                    temperature=0, stream=True,
                    stream_options={"include_usage": True}) as stream:
                n = 0
                for chunk in stream:
                    if chunk.usage is not None:
                        self.usage = chunk.usage
                    for c in chunk.choices:
                        if c.delta.content:
                            self.text += c.delta.content
                            n += 1
                            self.first.set()
                        self.finish = c.finish_reason or self.finish
                    if self.stop_after is not None and n >= self.stop_after:
                        break  # leaving the `with` closes the connection
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.t_end = time.monotonic()
            self.first.set()


def run_all(streams, timeout=300):
    for s in streams:
        s.start()
    for s in streams:
        s.join(timeout)
        assert not s.is_alive(), "a stream did not finish"
        assert s.error is None, repr(s.error)


def test_concurrent_streams_are_independent_and_match_alone(client, node):
    assert worker(node)["slots"] == 4
    expected = {q: alone(client, ask(q)) for q in QUESTIONS}
    # six streams on four slots: two of them queue, first come first served
    streams = [Stream(client, ask(q)) for q in QUESTIONS + QUESTIONS[:2]]
    run_all(streams)
    for s in streams:
        text, finish, n = expected[s.messages[0]["content"]]
        assert s.text == text, (s.messages, s.text, text)
        assert s.finish == finish and s.usage.completion_tokens == n
        assert s.usage.total_tokens == s.usage.prompt_tokens + s.usage.completion_tokens
    # they really ran side by side: the first four overlapped in time
    assert max(s.t_start for s in streams[:4]) < min(s.t_end for s in streams[:4])
    w = worker(node)
    assert w["in_flight"] == 0


def test_greedy_same_batched_as_alone(client):
    q = ask("List five fruits and say one thing about each.")
    text, finish, n = alone(client, q, max_tokens=48)
    streams = [Stream(client, q, max_tokens=48) for _ in range(4)]
    run_all(streams)
    assert [s.text for s in streams] == [text] * 4
    assert {s.finish for s in streams} == {finish}
    # completions endpoint, batched next to a chat stream
    prompt = "The three primary colors are"
    one = client.completions.create(model=CHAT, prompt=prompt, max_tokens=16, temperature=0)
    side = Stream(client, ask(QUESTIONS[0]))
    side.start()
    side.first.wait(120)
    again = client.completions.create(model=CHAT, prompt=prompt, max_tokens=16, temperature=0)
    side.join(300)
    assert again.choices[0].text == one.choices[0].text


def test_second_turn_reuses_the_prompt_cache(client):
    turn1 = [{"role": "system", "content": "You are a terse assistant."},
             {"role": "user", "content": "Name a big city in Japan."}]
    r1 = client.chat.completions.create(model=CHAT, messages=turn1, max_tokens=24, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And one in Italy?"}]
    r2 = client.chat.completions.create(model=CHAT, messages=turn2, max_tokens=24, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    # the whole first turn (prompt and reply) was still in the slot
    assert cached >= r1.usage.prompt_tokens, (cached, r1.usage, r2.usage)
    assert r2.usage.prompt_tokens > cached
    # the cache changes nothing in the result
    fresh = client.chat.completions.create(model=CHAT, messages=turn2, max_tokens=24,
                                           temperature=0)
    assert fresh.choices[0].message.content == r2.choices[0].message.content


def test_closing_one_stream_leaves_the_others_intact(client, node):
    long_q = ask("Write a long story about a dragon who learns to cook.")
    expected = {q: alone(client, ask(q), max_tokens=48)[0] for q in QUESTIONS[:3]}
    quitter = Stream(client, long_q, max_tokens=400, stop_after=3)
    others = [Stream(client, ask(q), max_tokens=48) for q in QUESTIONS[:3]]
    quitter.start()
    quitter.first.wait(120)
    run_all(others)
    quitter.join(60)
    assert quitter.error is None and len(quitter.text) > 0
    for s in others:
        assert s.text == expected[s.messages[0]["content"]]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (worker(node)["in_flight"] or worker(node).get("busy")):
        time.sleep(0.1)
    w = worker(node)
    assert w["in_flight"] == 0 and not w.get("busy"), w


# -------------------------------------------------------------- no model
def test_text_stream_holds_broken_utf8():
    ts = TextStream([])
    euro = "€".encode()
    assert ts.push(b"a" + euro[:1]) == ("a", False)
    assert ts.push(euro[1:2]) == ("", False)
    assert ts.push(euro[2:] + b"b") == ("€b", False)
    assert ts.push(b"\xe2\x82", final=True) == ("\ufffd", False)


def test_text_stream_never_leaks_a_stop_string():
    ts = TextStream(["STOP", "<|im_end|>"])
    out = []
    for piece in ["Hello S", "T", "ay <", "|im", "_en"]:
        text, stopped = ts.push(piece.encode())
        assert not stopped
        out.append(text)
    assert "".join(out) == "Hello STay "
    assert ts.push(b"d|> tail") == ("", True)
    ts = TextStream(["STOP"])
    assert ts.push(b"abST") == ("ab", False)
    assert ts.push(b"", final=True) == ("ST", False)
    assert ts.push(b"xSTOPy") == ("x", True)


def test_common_prefix():
    a = list(range(300))
    assert common_prefix(a, a) == 300
    assert common_prefix(a, a[:130] + [-1]) == 130
    assert common_prefix([], a) == 0
