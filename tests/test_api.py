"""The OpenAI API of one real node, driven with the official `openai` client."""

from __future__ import annotations

import base64
import json
import re
import time

import httpx
import numpy as np
import openai
import pytest

CHAT = "smollm2-135m-instruct"
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
NO_EOS = {"0": -100, "2": -100}   # <|endoftext|>, <|im_end|>: such a stream runs to max_tokens


def status(node) -> dict:
    return httpx.get(node.api + "/mesh/status", timeout=10).json()


def worker_of(node, model: str) -> dict:
    me = status(node)["nodes"][0]
    return next(m for m in me["models"] if m["id"] == model)


def assert_openai_error(r: httpx.Response, status_code: int) -> dict:
    assert r.status_code == status_code, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    return err


# ------------------------------------------------------------------ models
def test_models_list_and_retrieve(client):
    ids = {m.id for m in client.models.list().data}
    assert {CHAT, "whisper-tiny.en"} <= ids
    m = client.models.retrieve(CHAT)
    assert m.id == CHAT and m.object == "model" and m.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health_and_readyz(node):
    assert httpx.get(node.api + "/health").json() == {"status": "ok"}
    r = httpx.get(node.api + "/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


# -------------------------------------------------------------------- chat
def test_chat_non_stream(client):
    r = client.chat.completions.create(model=CHAT, messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}], max_tokens=32,
        temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == CHAT and r.created > 0
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert "Paris" in choice.message.content
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 32
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_stream_arrives_incrementally(client):
    t0 = time.monotonic()
    arrivals, text, finish, usage = [], [], None, None
    stream = client.chat.completions.create(model=CHAT, messages=STORY, max_tokens=80,
                                            stream=True, stream_options={"include_usage": True})
    first = None
    for chunk in stream:
        if first is None:
            first = chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                arrivals.append(time.monotonic() - t0)
                text.append(c.delta.content)
            finish = c.finish_reason or finish
    assert first.choices[0].delta.role == "assistant"
    assert first.object == "chat.completion.chunk"
    assert len(arrivals) >= 20, text
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= len(arrivals) - 1
    # Chunks arrive as tokens are made: the first content chunk comes well before the
    # stream ends, and the arrivals spread over the generation.
    total = arrivals[-1]
    assert arrivals[0] < 0.5 * total
    assert len({round(t, 3) for t in arrivals}) > len(arrivals) // 2


def test_chat_max_completion_tokens_and_stop(client):
    r = client.chat.completions.create(model=CHAT, messages=STORY, max_completion_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    full = client.chat.completions.create(model=CHAT, messages=STORY, max_tokens=30,
                                          temperature=0).choices[0].message.content
    word = full.split()[3]
    cut = client.chat.completions.create(model=CHAT, messages=STORY, max_tokens=30,
                                         temperature=0, stop=[word]).choices[0]
    assert word not in cut.message.content and cut.finish_reason == "stop"
    assert full.startswith(cut.message.content.rstrip())


def test_seed_gives_same_text(client):
    kw = dict(model=CHAT, messages=STORY, max_tokens=40, temperature=1.0, top_p=0.95,
              presence_penalty=0.3, frequency_penalty=0.2)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content
              for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds never changed the text"


# ------------------------------------------------------------- completions
def test_completions(client):
    r = client.completions.create(model=CHAT, prompt="The three primary colors are",
                                  max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.completion_tokens <= 16
    chunks = list(client.completions.create(model=CHAT, prompt="The three primary colors are",
                                            max_tokens=16, temperature=0, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# -------------------------------------------------------------- embeddings
def test_embeddings(client):
    s = "The quick brown fox jumps over the lazy dog."
    one = client.embeddings.create(model=CHAT, input=s)
    vec = np.array(one.data[0].embedding)
    assert vec.shape == (576,)                     # SmolLM2-135M's hidden size
    again = np.array(client.embeddings.create(model=CHAT, input=[s, "Quantum chromodynamics"]).data[0].embedding)
    cos = float(vec @ again / np.linalg.norm(vec) / np.linalg.norm(again))
    assert cos > 0.999
    both = client.embeddings.create(model=CHAT, input=[s, "Quantum chromodynamics"])
    assert [d.index for d in both.data] == [0, 1]
    other = np.array(both.data[1].embedding)
    assert float(vec @ other / np.linalg.norm(vec) / np.linalg.norm(other)) < 0.99
    assert one.usage.prompt_tokens > 5
    # base64, as the openai client asks for by default over raw HTTP
    raw = httpx.post(client.base_url.join("embeddings").__str__(),
                     json={"model": CHAT, "input": s, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vec, atol=1e-5)


# ----------------------------------------------------------- transcription
def _words(text: str) -> str:
    return re.sub(r"[^a-z ]", "", text.lower()).strip()


def test_transcription_formats(client, speech_wav):
    with open(speech_wav, "rb") as f:
        r = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert _words(r.text) == "hello world"
    with open(speech_wav, "rb") as f:
        v = client.audio.transcriptions.create(model="whisper-tiny.en", file=f,
                                               response_format="verbose_json", language="en",
                                               temperature=0, prompt="Greetings.")
    assert v.language in ("en", "english") and v.duration > 0.5 and v.segments
    with open(speech_wav, "rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    assert re.search(r"^1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\n", srt)
    with open(speech_wav, "rb") as f:
        vtt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="vtt")
    assert vtt.startswith("WEBVTT") and "hello" in vtt.lower()
    with open(speech_wav, "rb") as f:
        text = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="text")
    assert _words(text) == "hello world"


# ------------------------------------------------------------------ errors
def test_malformed_json(node):
    r = httpx.post(node.v1 + "/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


@pytest.mark.parametrize("body, param", [
    ({"model": CHAT}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": CHAT, "messages": "hi"}, "messages"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
])
def test_bad_fields(node, body, param):
    err = assert_openai_error(httpx.post(node.v1 + "/chat/completions", json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_unknown_model_lists_available(node, client):
    r = httpx.post(node.v1 + "/chat/completions",
                   json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    err = assert_openai_error(r, 404)
    assert err["code"] == "model_not_found" and CHAT in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-9", input="x")


def test_body_too_large(node):
    big = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "x" * (5 << 20)}]})
    err = assert_openai_error(httpx.post(node.v1 + "/chat/completions", content=big,
                                         headers={"content-type": "application/json"}), 413)
    assert err["code"] == "payload_too_large"


def test_unsupported_audio(client, node):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"RIFF not audio at all" * 50))
    assert "audio" in str(e.value).lower()
    r = httpx.post(node.v1 + "/audio/transcriptions", json={"model": "whisper-1"})
    assert_openai_error(r, 400)


def test_wrong_backend_and_unknown_route(node):
    r = httpx.post(node.v1 + "/chat/completions",
                   json={"model": "whisper-1", "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(r, 400)
    assert_openai_error(httpx.get(node.v1 + "/nothing/here"), 404)
    assert_openai_error(httpx.delete(node.v1 + "/chat/completions"), 405)


# ------------------------------------------------------- disconnect, crash
def until(fn, what: str, timeout: float):
    """fn() until it returns a truthy value (polling an API with a deadline)."""
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)
    return value


def test_disconnect_stops_generation(node, client):
    """Closing a stream ends its generation in the worker. `busy` is the worker's own
    count of occupied batch slots (its scheduler answers `stats` once a second), not the
    node's count of requests in flight: it reads 1 while the stream runs, and 0 again
    once the worker dropped the request, where the request left alone would go on for
    1900 tokens (no end-of-text token can end it: about 20 s at this model's best speed
    here, more on a loaded machine)."""
    with client.chat.completions.create(model=CHAT, messages=STORY, max_tokens=1900,
                                        temperature=0, logit_bias=NO_EOS,
                                        stream=True) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        until(lambda: worker_of(node, CHAT).get("busy") == 1, "the worker took the request", 30)
    until(lambda: worker_of(node, CHAT).get("busy") == 0, "the worker dropped the request", 10)
    assert worker_of(node, CHAT)["in_flight"] == 0


def test_kill_worker_fails_inflight_and_recovers(node, client):
    pid = worker_of(node, CHAT)["pid"]
    with pytest.raises(openai.APIError):
        with client.chat.completions.create(model=CHAT, messages=STORY, max_tokens=2000,
                                            stream=True) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    import os, signal
                    os.kill(pid, signal.SIGKILL)
    r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8)
    assert r.choices[0].message.content
    w = worker_of(node, CHAT)
    assert w["pid"] != pid and w["restarts"] >= 1 and w["state"] == "loaded"


@pytest.mark.parametrize("method, path", [("TRACE", "/v1/embeddings"), ("OPTIONS", "/v1/embeddings"),
                                          ("GET", "/v1/chat/completions"), ("POST", "/nowhere")])
def test_keep_alive_survives_an_early_error_with_a_late_body(node, method, path):
    """A response sent before the request body arrived must not wedge the connection
    (found by schemathesis: the next request on it used to hang forever)."""
    import socket
    host, port = node.api.removeprefix("http://").rsplit(":", 1)
    body = b'{"model": "x"}'
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.1)          # the body comes late, as a slow client sends it
        s.sendall(body)
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 ")
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while b'{"status": "ok"}' not in buf:
            chunk = s.recv(65536)
            assert chunk, "connection closed"
            buf += chunk


def test_openapi_documents_every_route(node):
    doc = httpx.get(node.api + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    ops = [(p, m, o) for p, item in doc["paths"].items() for m, o in item.items()]
    assert {"/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions",
            "/mesh/status", "/mesh/keys"} <= set(doc["paths"])
    undocumented = [f"{m.upper()} {p}" for p, m, o in ops if "." in o["summary"] or "_" in o["summary"]]
    assert not undocumented, f"routes without a summary in api/openapi.py DOCS: {undocumented}"
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["x-mesh-feature"] == "chat"
    assert "messages" in doc["components"]["schemas"]["ChatRequest"]["properties"]
