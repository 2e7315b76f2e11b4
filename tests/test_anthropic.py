"""Anthropic's Messages API (/v1/messages) with the official `anthropic` SDK, on real nodes:
SmolLM2 for text, stop sequences and streaming; Qwen2.5-Coder-0.5B for tools and JSON;
a node with API keys for the SDK's authentication errors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import pytest

from api.anthropic_routes import FIELDS
from tests.procs import MeshNode, run_cli

anthropic = pytest.importorskip("anthropic")

CHAT = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TOOLS = [{"name": "get_weather", "description": "Current weather in a city",
          "input_schema": WEATHER},
         {"name": "get_time", "description": "Current time in a timezone",
          "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}},
                           "required": ["timezone"]}}]
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
# The SDK's create() no longer has sampling arguments (2.x); the API takes them in the body.
T0 = {"temperature": 0}
STORY = [{"role": "user", "content": "Tell me a short story about a cat who finds a key."}]


def _client(node: MeshNode, key: str = "unused"):
    return anthropic.Anthropic(base_url=node.api, api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    n = MeshNode(tmp_path_factory.mktemp("anthropic"), ["--name", "a", "--no-mdns",
                                                         "--model", CHAT]).start()
    try:
        n.wait_ready()
        yield _client(n), n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    n = MeshNode(tmp_path_factory.mktemp("anthropic-tools"), ["--name", "q", "--no-mdns",
                                                               "--model", QWEN]).start()
    try:
        n.wait_ready()
        yield _client(n), n
    finally:
        n.stop()


def _text(msg) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


# ---------------------------------------------------------------- text
def test_create_returns_a_message_with_usage(smol) -> None:
    client, node = smol
    r = client.messages.with_raw_response.create(
        model=CHAT, max_tokens=6, messages=STORY, extra_body=T0,
        system=[{"type": "text", "text": "You are a storyteller."}],
        metadata={"user_id": "u-1"}, service_tier="standard_only")
    assert r.headers["x-mesh-node"] == "a"
    msg = r.parse()
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == CHAT
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text.strip()
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    assert msg.usage.output_tokens == 6
    assert msg.usage.input_tokens > 0 and msg.usage.cache_read_input_tokens == 0
    assert msg.usage.service_tier == "standard"
    short = client.messages.create(model=CHAT, max_tokens=60, extra_body=T0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Say only the word 'yes'."}]}])
    assert short.stop_reason == "end_turn" and short.usage.output_tokens < 60
    assert _text(short).strip()


def test_the_sdks_models_list_reads_the_mesh_models(smol) -> None:
    client, _ = smol
    ids = [m.id for m in client.models.list()]
    assert CHAT in ids and all(m.type == "model" for m in client.models.list())
    assert client.models.retrieve(CHAT).id == CHAT


def test_sampling_fields_are_honoured(smol) -> None:
    client, _ = smol
    greedy = _text(client.messages.create(model=CHAT, max_tokens=12, messages=STORY,
                                          extra_body=T0))
    for body in ({"temperature": 1, "top_k": 1}, {"temperature": 1, "top_p": 0.0001}):
        assert _text(client.messages.create(model=CHAT, max_tokens=12, messages=STORY,
                                            extra_body=body)) == greedy
    with pytest.raises(anthropic.BadRequestError) as ei:         # Anthropic's range: 0-1
        client.messages.create(model=CHAT, max_tokens=2, messages=STORY,
                               extra_body={"temperature": 1.5})
    assert "temperature" in ei.value.body["error"]["message"]


def test_stop_sequences_end_the_text_and_are_named(smol) -> None:
    client, _ = smol
    free = _text(client.messages.create(model=CHAT, max_tokens=24, messages=STORY,
                                        extra_body=T0))
    word = free.split()[len(free.split()) // 2]
    assert word in free, free
    r = client.messages.create(model=CHAT, max_tokens=24, messages=STORY, extra_body=T0,
                               stop_sequences=["\x00never", word])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == word
    assert _text(r) == free[:free.index(word)]


def test_stream_helper_gives_the_same_text_and_final_message(smol) -> None:
    client, _ = smol
    kw = dict(model=CHAT, max_tokens=20, messages=STORY, extra_body=T0)
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == _text(whole) and text
    assert final.content[0].text == text and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    assert final.id.startswith("msg_")
    # The raw events, in Anthropic's order (the SDK hides ping).
    kinds = [ev.type for ev in client.messages.create(stream=True, **kw)]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    with client.messages.stream(stop_sequences=[text.split()[2]], **kw) as stream:
        stopped = stream.get_final_message()
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == text.split()[2]


def test_raw_stream_has_event_lines_and_a_ping(smol) -> None:
    _, node = smol
    with httpx.stream("POST", node.api + "/v1/messages", timeout=120, json={
            "model": CHAT, "max_tokens": 3, "stream": True, "messages": STORY}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert lines[:2] == ["event: message_start", "event: ping"]
    assert lines[-1] == "event: message_stop"


def test_a_failure_mid_stream_is_an_error_event(tmp_path) -> None:
    """The request deadline passes while the text streams: an `error` event ends it."""
    n = MeshNode(tmp_path / "home", ["--name", "slow", "--no-mdns", "--model", CHAT],
                 env={"MESH_REQUEST_TIMEOUT": "4"}).start()
    try:
        n.wait_ready()
        text = []
        with pytest.raises(anthropic.APIStatusError) as ei:
            with _client(n).messages.stream(model=CHAT, max_tokens=4000, extra_body=T0, messages=[
                    {"role": "user", "content": "Count from 1 to 2000: 1, 2, 3,"}]) as stream:
                text.extend(stream.text_stream)
        assert text, "the stream should have started before the deadline"
        assert ei.value.body["type"] == "error" and "deadline" in ei.value.body["error"]["message"]
    finally:
        n.stop()


# ---------------------------------------------------------------- errors
def test_errors_are_the_sdks_exception_classes(smol) -> None:
    client, node = smol
    with pytest.raises(anthropic.NotFoundError) as ei:
        client.messages.create(model="no-such-model", max_tokens=4, messages=STORY)
    assert ei.value.body["type"] == "error"
    assert ei.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in ei.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as ei:       # malformed: max_tokens < 1
        client.messages.create(model=CHAT, max_tokens=-1, messages=STORY)
    assert ei.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in ei.value.body["error"]["message"]
    r = httpx.post(node.api + "/v1/messages", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as ei:
        client.messages.create(model=CHAT, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    assert "'image'" in ei.value.body["error"]["message"]
    assert "messages[0].content[1]" in ei.value.body["error"]["message"]


@pytest.mark.parametrize("kw, named", [
    (dict(thinking={"type": "enabled", "budget_tokens": 1024}), "thinking"),
    (dict(extra_body={"frequency_penalty": 1}), "frequency_penalty"),
    (dict(speed="fast"), "speed"),
    (dict(output_config={"effort": "high"}), "output_config.effort"),
    (dict(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "web_search"),
    (dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]),
     "prefill"),
    (dict(messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}]),
     "'document'"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "colour": 1}]}]),
     "colour"),
    (dict(extra_headers={"anthropic-beta": "files-api-2025-04-14"}), "files-api-2025-04-14"),
    (dict(tool_choice={"type": "auto"}), "tool_choice"),           # auto needs tools
    (dict(messages=[{"role": "user", "content": []}]), "messages[0]: content"),
    (dict(stop_sequences=[""]), "stop_sequences"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(smol, kw, named) -> None:
    client, _ = smol
    args = dict(model=CHAT, max_tokens=4, messages=STORY) | kw
    with pytest.raises(anthropic.BadRequestError) as ei:
        client.messages.create(**args)
    assert named in ei.value.body["error"]["message"]


def test_neutral_values_of_refused_fields_are_accepted(smol) -> None:
    client, _ = smol
    r = client.messages.create(model=CHAT, max_tokens=2, messages=STORY, speed="standard",
                               thinking={"type": "disabled"},
                               cache_control={"type": "ephemeral"})
    assert r.usage.output_tokens == 2


def test_every_sdk_field_is_classified() -> None:
    from anthropic.types import message_create_params as p
    keys = p.MessageCreateParamsNonStreaming
    fields = set(keys.__required_keys__) | set(keys.__optional_keys__)
    assert fields - set(FIELDS) == set(), "classify them in api/anthropic_routes.py FIELDS"
    doc = (Path(__file__).resolve().parents[1] / "docs" / "anthropic.md").read_text()
    missing = [f for f in FIELDS if f"`{f}`" not in doc]
    assert not missing, f"docs/anthropic.md does not list {missing}"


def test_openapi_documents_the_routes_and_their_error_shape(smol) -> None:
    _, node = smol
    doc = httpx.get(node.api + "/openapi.json", timeout=30).json()
    op = doc["paths"]["/v1/messages"]["post"]
    assert op["x-mesh-feature"] == "chat" and "count_tokens" in str(doc["paths"])
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/MessagesRequest")
    ref = op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"]
    r = httpx.post(node.api + "/v1/messages", json={"model": CHAT, "messages": STORY}, timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    jsonschema.validate(r.json(), doc["components"]["schemas"][ref.rsplit("/", 1)[-1]])


def test_count_tokens_matches_the_prompt_of_a_generation(smol) -> None:
    client, _ = smol
    n = client.messages.count_tokens(model=CHAT, messages=STORY, system="Be brief.")
    r = client.messages.create(model=CHAT, max_tokens=1, messages=STORY, system="Be brief.")
    assert n.input_tokens > 0
    assert n.input_tokens == r.usage.input_tokens + r.usage.cache_read_input_tokens
    longer = client.messages.count_tokens(model=CHAT, messages=STORY, system="Be brief. " * 5)
    assert longer.input_tokens > n.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=STORY)


# ---------------------------------------------------------------- tools
def _tool_use(msg):
    (block,) = [b for b in msg.content if b.type == "tool_use"]
    return block


def test_count_tokens_counts_the_tools_as_the_template_renders_them(qwen) -> None:
    client, _ = qwen
    bare = client.messages.count_tokens(model=QWEN, messages=ASK)
    n = client.messages.count_tokens(model=QWEN, messages=ASK, tools=TOOLS)
    r = client.messages.create(model=QWEN, max_tokens=1, messages=ASK, tools=TOOLS,
                               tool_choice={"type": "none"})
    assert n.input_tokens > bare.input_tokens
    assert n.input_tokens == r.usage.input_tokens + r.usage.cache_read_input_tokens


def test_a_named_tool_round_trip(qwen) -> None:
    client, _ = qwen
    first = client.messages.create(model=QWEN, max_tokens=120, extra_body=T0, messages=ASK,
                                   tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"})
    assert first.stop_reason == "tool_use"
    call = _tool_use(first)
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER)
    assert call.input["unit"] == "celsius"
    history = ASK + [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": [{"type": "text", "text": json.dumps(
                                          {"temperature": 18, "sky": "clear"})}]}]}]
    final = client.messages.create(model=QWEN, max_tokens=60, extra_body=T0, messages=history,
                                   tools=TOOLS, tool_choice={"type": "none"})
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in final.content] == ["text"]
    assert "18" in _text(final)                       # the answer uses the tool's result


def test_is_error_reaches_the_model(qwen) -> None:
    client, _ = qwen
    def count(**flag):
        return client.messages.count_tokens(model=QWEN, messages=ASK + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                               "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": "city not found", **flag}]}]).input_tokens
    assert count(is_error=True) > count(is_error=False) == count()


def test_any_with_parallel_use_disabled_gives_one_valid_call(qwen) -> None:
    client, _ = qwen
    r = client.messages.create(model=QWEN, max_tokens=150, extra_body=T0, tools=TOOLS,
                               tool_choice={"type": "any", "disable_parallel_tool_use": True},
                               messages=[{"role": "user", "content": "What time is it in Tokyo?"}])
    call = _tool_use(r)
    assert call.name in ("get_weather", "get_time")
    jsonschema.validate(call.input, next(t for t in TOOLS if t["name"] == call.name)["input_schema"])


def test_streamed_tool_use_reassembles_into_the_same_input(qwen) -> None:
    client, _ = qwen
    kw = dict(model=QWEN, max_tokens=120, extra_body=T0, messages=ASK, tools=TOOLS,
              tool_choice={"type": "tool", "name": "get_weather"})
    whole = _tool_use(client.messages.create(**kw))
    pieces, starts = [], []
    with client.messages.stream(**kw) as stream:
        for ev in stream:
            if ev.type == "content_block_start":
                starts.append(ev.content_block)
            elif ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                pieces.append(ev.delta.partial_json)
        final = stream.get_final_message()
    (start,) = starts
    assert start.type == "tool_use" and start.name == "get_weather" and start.input == {}
    assert pieces and json.loads("".join(pieces)) == whole.input
    assert final.stop_reason == "tool_use" and _tool_use(final).input == whole.input


def test_auto_tool_choice_calls_a_tool_when_one_answers(qwen) -> None:
    """Anthropic's default with tools is auto: the model picks between text and a call."""
    client, _ = qwen
    r = client.messages.create(model=QWEN, max_tokens=120, extra_body=T0, messages=ASK,
                               tools=TOOLS)
    assert r.stop_reason == "tool_use"
    call = _tool_use(r)
    assert call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER)


def test_output_config_format_constrains_the_text_to_the_schema(qwen) -> None:
    client, _ = qwen
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"]}
    r = client.messages.create(model=QWEN, max_tokens=80, extra_body=T0, messages=[
        {"role": "user", "content": "Name the capital of France and its country, as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(_text(r)), schema)


# ---------------------------------------------------------------- keys
def test_api_keys_through_the_sdk(tmp_path) -> None:
    """A mesh with keys: the SDK's x-api-key is checked like a bearer token."""
    n = MeshNode(tmp_path / "home", ["--no-models", "--no-mdns", "--name", "k"]).start()
    try:
        n.wait_ready()
        made = {}
        for name, features in (("owner", "admin"), ("emb", "embeddings"), ("bot", "chat")):
            r = run_cli("keys", "create", "--name", name, "--features", features, "--url", n.api,
                        *(["--key", made["owner"]] if made else []))
            assert r.returncode == 0, r.stderr
            made[name] = r.stdout.strip().splitlines()[-1].split()[-1]
        with pytest.raises(anthropic.AuthenticationError) as ei:
            _client(n, "mk-0000-nope").messages.create(model=CHAT, max_tokens=4, messages=STORY)
        assert ei.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.PermissionDeniedError) as ei:
            _client(n, made["emb"]).messages.create(model=CHAT, max_tokens=4, messages=STORY)
        assert "chat" in ei.value.body["error"]["message"]
        with pytest.raises(anthropic.NotFoundError):    # past the door: no model is loaded
            _client(n, made["bot"]).messages.create(model=CHAT, max_tokens=4, messages=STORY)
    finally:
        n.stop()
