"""OpenAI's Responses API with the official openai client, on a two-node mesh: node a
serves SmolLM2 and Qwen2.5-Coder-0.5B, node b serves nothing (it proxies generations to a
and asks a for the responses a stored, and a asks b for b's). Shapes are validated
against OpenAI's own schemas (../shared/data/openai-openapi.json, `nullable` honoured)."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from api.responses_routes import RESPONSE_FIELDS, ResponsesRequest
from tests import openai_spec
from tests.procs import MeshNode, run_cli

CHAT = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": WEATHER, "strict": True}]
FORCE = {"type": "function", "name": "get_weather"}


def eventually(fn, timeout=20.0, interval=0.2):
    """fn() until it returns a truthy value (gossip has no event a client can await)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except (httpx.HTTPError, openai.APIError):
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --------------------------------------------------------------------- the spec
@pytest.fixture(scope="module")
def validate():
    doc = openai_spec.nullable(openai_spec.load())
    registry = Registry().with_resource(
        "urn:openai", Resource.from_contents(doc, default_specification=DRAFT202012))
    schemas = doc["components"]["schemas"]
    by_type = {}            # stream event type -> its schema's name
    for ref in schemas["ResponseStreamEvent"]["anyOf"]:
        name = ref["$ref"].rsplit("/", 1)[-1]
        by_type[schemas[name]["properties"]["type"]["enum"][0]] = name

    def check(obj, name: str | None = None) -> None:
        name = name or by_type[obj["type"]]
        schema = {"$ref": f"urn:openai#/components/schemas/{name}"}
        jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)
    return check


def test_every_create_field_is_classified_and_declared() -> None:
    fields = openai_spec.properties("CreateResponse")
    assert {"input", "previous_response_id", "tools", "text"} <= fields
    assert sorted(fields - set(RESPONSE_FIELDS)) == [], "fields of the spec nobody classified"
    assert sorted(set(RESPONSE_FIELDS) - set(ResponsesRequest.model_fields)) == []
    assert set(RESPONSE_FIELDS.values()) <= {"honoured", "accepted", "refused"}


# ------------------------------------------------------------------- the mesh
@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    token = run_cli("token").stdout.strip()
    tmp = tmp_path_factory.mktemp("responses")
    a = MeshNode(tmp / "a", ["--name", "a", "--token", token, "--no-mdns",
                             "--model", CHAT, "--model", QWEN]).start()
    addr = a.wait_for(r"mesh: p2p (/ip4/127\.0\.0\.1/\S+)").group(1)
    b = MeshNode(tmp / "b", ["--name", "b", "--no-models", "--token", token, "--no-mdns",
                             "--peer", addr]).start()
    try:
        a.wait_ready()
        b.wait_ready()
        assert eventually(lambda: {CHAT, QWEN} <= {
            m["id"] for m in httpx.get(b.v1 + "/models", timeout=5).json()["data"]})
        yield {"a": a, "b": b}
    finally:
        b.stop()
        a.stop()


def client(node, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=node.v1, api_key=key, max_retries=0, timeout=300)


def events_of(stream) -> list[dict]:
    return [e.model_dump(mode="json", exclude_unset=True) for e in stream]


def raw_events(node, body: dict) -> list[dict]:
    """The SSE stream as sent: each event's data, checked against its `event:` line."""
    out, kind = [], None
    with httpx.stream("POST", node.v1 + "/responses", json={**body, "stream": True},
                      timeout=300) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append(json.loads(line[6:]))
                assert out[-1]["type"] == kind
    return out


def test_plain_response(mesh, validate) -> None:
    raw = client(mesh["a"]).responses.with_raw_response.create(
        model=CHAT, input="Say hello.", instructions="Answer in one short sentence.",
        max_output_tokens=24, temperature=0, metadata={"run": "plain"})
    r = raw.parse()
    validate(json.loads(raw.text), "Response")
    assert raw.headers["x-mesh-node"] == "a"
    assert r.id.startswith("resp_") and r.object == "response" and r.model == CHAT
    assert r.status in ("completed", "incomplete") and r.output_text.strip()
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].text == r.output_text
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 24
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Answer in one short sentence." and r.metadata == {"run": "plain"}
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_streamed_events_in_order_and_deltas_join(mesh, validate) -> None:
    body = {"model": CHAT, "max_output_tokens": 32, "temperature": 0,
            "input": [{"role": "user", "content": [{"type": "input_text",
                                                     "text": "Write about the sea."}]}]}
    events = events_of(client(mesh["a"]).responses.create(**body, stream=True))
    for e in raw_events(mesh["a"], body):
        validate(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 3
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", types[-1]])
    final = events[-1]["response"]
    assert types[-1] == f"response.{final['status']}"
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    text = "".join(d["delta"] for d in deltas)
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert text.strip() and done["text"] == text
    assert final["output"][0]["content"][0]["text"] == text
    assert all("obfuscation" in d for d in deltas)            # on by default, as OpenAI
    # the SDK's own stream helper assembles the same thing, and the stored copy matches
    with client(mesh["a"]).responses.stream(model=CHAT, input="Write about the sea.",
                                            max_output_tokens=32, temperature=0,
                                            stream_options={"include_obfuscation": False}) as s:
        seen = events_of(s)
        assert not any("obfuscation" in e for e in seen)
        assert "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta") == text
    stored = client(mesh["a"]).responses.retrieve(final["id"])
    assert stored.output_text == text and stored.usage.output_tokens == final["usage"]["output_tokens"]


def test_a_forced_function_call_then_its_output_gives_a_text_answer(mesh, validate) -> None:
    c = client(mesh["a"])
    ask = "What is the weather in Paris, in celsius?"
    raw = c.responses.with_raw_response.create(model=QWEN, input=ask, tools=TOOLS,
                                               tool_choice=FORCE, temperature=0,
                                               max_output_tokens=120)
    validate(json.loads(raw.text), "Response")
    first = raw.parse()
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    args = json.loads(call.arguments)
    jsonschema.validate(args, WEATHER)
    assert args["unit"] == "celsius" and "Paris" in args["city"]
    # streamed, the same call arrives as function_call_arguments events
    body = dict(model=QWEN, input=ask, tools=TOOLS, tool_choice=FORCE, temperature=0,
                max_output_tokens=120)
    events = events_of(c.responses.create(**body, stream=True))
    for e in raw_events(mesh["a"], body):
        validate(e)
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["name"] == "get_weather" and done["arguments"] == call.arguments
    assert "".join(e["delta"] for e in events
                   if e["type"] == "response.function_call_arguments.delta") == call.arguments
    assert events[-1]["type"] == "response.completed"
    # the tool's result, continuing the stored conversation
    second = c.responses.create(
        model=QWEN, previous_response_id=first.id, tools=TOOLS, tool_choice="none",
        temperature=0, max_output_tokens=60,
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": json.dumps({"temperature": 18, "sky": "clear"})}])
    assert [o.type for o in second.output] == ["message"] and "18" in second.output_text
    assert second.previous_response_id == first.id


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)


def test_text_format_json_schema_output_validates(mesh) -> None:
    c = client(mesh["a"])
    schema = {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
        "required": ["colour", "count"], "additionalProperties": False}
    r = c.responses.create(model=CHAT, input="Pick a colour and a number.", temperature=0,
                           max_output_tokens=40, text={"format": {
                               "type": "json_schema", "name": "pick", "schema": schema,
                               "description": "A colour and how many of it"}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"
    r = c.responses.create(model=CHAT, input="Give me a JSON object about a cat.",
                           max_output_tokens=60, temperature=0,
                           text={"format": {"type": "json_object"}})
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)
    else:
        assert r.output_text.lstrip().startswith("{")
    parsed = c.responses.parse(model=QWEN, input="Which city is the Eiffel Tower in?",
                               text_format=City, temperature=0, max_output_tokens=60)
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.country == "France"


ASK_COLOUR = "What is my favourite colour? Answer with one word."


def test_previous_response_continued_on_another_node(mesh) -> None:
    a, b = client(mesh["a"]), client(mesh["b"])
    first = a.responses.create(
        model=QWEN, temperature=0, max_output_tokens=16,
        input="My favourite colour is teal.")
    assert "_" in first.id[5:]                          # the id names the node that stored it
    raw = b.responses.with_raw_response.create(
        model=QWEN, previous_response_id=first.id, temperature=0, max_output_tokens=16,
        input=ASK_COLOUR)
    second = raw.parse()
    assert raw.headers["x-mesh-node"] == "a"             # generated on a, stored on b
    assert "teal" in second.output_text.lower()
    alone = b.responses.create(model=QWEN, temperature=0, max_output_tokens=16, store=False,
                               input=ASK_COLOUR)
    assert "teal" not in alone.output_text.lower()
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    # each node reads, lists and deletes what the other stored
    assert a.responses.retrieve(second.id).output_text == second.output_text
    assert b.responses.retrieve(first.id).output_text == first.output_text
    assert [i.content[0].text for i in a.responses.input_items.list(second.id)] == [ASK_COLOUR]
    b.responses.delete(first.id)
    for c in (a, b):
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as ei:
        b.responses.create(model=QWEN, previous_response_id=first.id, input="And now?",
                           max_output_tokens=16)
    assert ei.value.body["param"] == "previous_response_id"


def test_input_items_are_paginated_as_the_spec_says(mesh, validate) -> None:
    c = client(mesh["b"])
    history = [{"role": "system", "content": "You count."},
               {"role": "user", "content": "one"},
               {"role": "assistant", "content": [{"type": "output_text", "text": "two"}]},
               {"type": "function_call", "call_id": "call_1", "name": "next", "arguments": "{}"},
               {"type": "function_call_output", "call_id": "call_1", "output": "four"},
               {"role": "user", "content": "five?"}]
    r = c.responses.create(model=CHAT, input=history, max_output_tokens=16)
    raw = httpx.get(f"{mesh['a'].v1}/responses/{r.id}/input_items", timeout=30,
                    params={"limit": 2, "order": "asc"})
    page = raw.json()
    validate(page, "ResponseItemList")
    assert page["has_more"] is True and len(page["data"]) == 2
    assert [i["type"] for i in page["data"]] == ["message", "message"]
    asc = list(c.responses.input_items.list(r.id, limit=2, order="asc"))   # follows `after`
    assert [i.type for i in asc] == ["message", "message", "message", "function_call",
                                     "function_call_output", "message"]
    assert asc[0].id == page["first_id"] and asc[1].id == page["last_id"]
    assert asc[3].call_id == "call_1" and asc[4].output == "four"
    assert [i.id for i in c.responses.input_items.list(r.id)] == [i.id for i in asc][::-1]
    for item in httpx.get(f"{mesh['a'].v1}/responses/{r.id}/input_items", timeout=30).json()["data"]:
        validate(item, "ItemResource")
    last = httpx.get(f"{mesh['a'].v1}/responses/{r.id}/input_items", timeout=30,
                     params={"after": asc[-2].id, "order": "asc"}).json()
    assert [i["id"] for i in last["data"]] == [asc[-1].id] and last["has_more"] is False
    r = httpx.get(f"{mesh['a'].v1}/responses/{r.id}/input_items", params={"limit": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_store_false_keeps_nothing(mesh) -> None:
    c = client(mesh["a"])
    r = c.responses.create(model=CHAT, input="Hi", max_output_tokens=16, store=False)
    assert r.output_text and r.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=CHAT, input="Hi", previous_response_id=r.id, max_output_tokens=16)


# a value that asks for something, per refused field
ASKS = {"background": True, "conversation": "conv_1", "context_management": [{"type": "compaction"}],
        "moderation": {"model": "omni-moderation-latest"}, "prompt": {"id": "pmpt_1"},
        "prompt_cache_options": {"ttl": "30m"}, "reasoning": {"effort": "high"}}
ACCEPTED = {"user": "u1", "safety_identifier": "s1", "prompt_cache_key": "k",
            "prompt_cache_retention": "24h", "service_tier": "auto", "max_tool_calls": 3}


def test_every_field_is_honoured_refused_or_accepted(mesh, validate) -> None:
    base = {"model": CHAT, "input": "hi", "max_output_tokens": 16}
    url = mesh["a"].v1 + "/responses"
    for name, kind in RESPONSE_FIELDS.items():
        if kind == "refused":
            r = httpx.post(url, json={**base, name: ASKS[name]}, timeout=60)
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["param"] == name and name in r.json()["error"]["message"]
            validate(r.json(), "ErrorResponse")
        elif kind == "accepted":
            r = httpx.post(url, json={**base, name: ACCEPTED[name]}, timeout=60)
            assert r.status_code == 200, (name, r.text)
    for body, param in [({"truncation": "auto"}, "truncation"),
                        ({"include": ["reasoning.encrypted_content"]}, "include[0]"),
                        ({"text": {"verbosity": "high"}}, "text.verbosity"),
                        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
                        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
                        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image",
                                                                  "image_url": "x"}]}]},
                         "input[0].content[0]"),
                        ({"not_an_openai_field": 1}, "not_an_openai_field")]:
        r = httpx.post(url, json={**base, **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(url, timeout=60, json={**base, "top_logprobs": 2,
                                          "include": ["message.output_text.logprobs"]})
    part = r.json()["output"][0]["content"][0]
    assert part["logprobs"] and "".join(t["token"] for t in part["logprobs"]) == part["text"]
    assert all(len(t["top_logprobs"]) == 2 for t in part["logprobs"])


def test_errors_in_openais_shape(mesh, validate) -> None:
    c = client(mesh["b"])
    with pytest.raises(openai.NotFoundError) as ei:
        c.responses.create(model="no-such-model", input="hi")
    assert ei.value.body["code"] == "model_not_found"
    url = mesh["b"].v1 + "/responses"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    validate(r.json(), "ErrorResponse")
    r = httpx.post(url, json={"model": CHAT, "input": 42})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input")
    r = httpx.post(url, json={"model": CHAT})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(url, json={"model": CHAT, "input": "hi", "max_output_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"
    a_id = httpx.get(mesh["a"].api + "/mesh/status", timeout=10).json()["self"]["id"]
    for bad in ("resp_nothing", f"resp_{a_id}_000", "x"):      # the second is asked of a
        with pytest.raises(openai.NotFoundError) as ei:
            c.responses.create(model=CHAT, input="hi", previous_response_id=bad)
        assert ei.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(bad)
        with pytest.raises(openai.NotFoundError):
            c.responses.delete(bad)
    r = httpx.get(mesh["b"].v1 + "/responses/resp_nothing", timeout=30)
    validate(r.json(), "ErrorResponse")
    t0 = time.monotonic()          # an id naming a node this mesh cannot reach: said so, soon
    r = httpx.get(f"{mesh['b'].v1}/responses/resp_{a_id[:-6]}zzzzzz_000", timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "peer_error", r.text
    assert "cannot be reached" in r.json()["error"]["message"] and time.monotonic() - t0 < 12


def test_a_stored_response_is_its_keys_alone(mesh) -> None:
    """Last: from here on the mesh needs API keys."""
    a, b = mesh["a"], mesh["b"]

    def create_key(name, features, key=None):
        r = run_cli("keys", "create", "--name", name, "--features", features, "--url", a.api,
                    *(["--key", key] if key else []))
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1].split()[-1]
    admin = create_key("owner", "admin")
    k1, k2 = create_key("one", "chat,models", admin), create_key("two", "chat,models", admin)
    assert eventually(lambda: httpx.get(b.v1 + "/models").status_code == 401)   # b has them too
    r = client(a, k1).responses.create(model=CHAT, input="Hi", max_output_tokens=16)
    for node in (a, b):
        with pytest.raises(openai.NotFoundError):
            client(node, k2).responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            client(node, k2).responses.create(model=CHAT, input="Hi", max_output_tokens=16,
                                              previous_response_id=r.id)
        with pytest.raises(openai.NotFoundError):
            client(node, k2).responses.delete(r.id)
        assert client(node, k1).responses.retrieve(r.id).output_text == r.output_text
    with pytest.raises(openai.AuthenticationError):
        client(b).responses.retrieve(r.id)


# ---------------------------------------------------------------- the store itself
def test_the_store_expires_rows_and_runs_in_wal_mode(tmp_path) -> None:
    import trio

    from node.responses import ResponseStore
    clock = [1000.0]
    store = ResponseStore(tmp_path / "responses.db", retention_days=1, now=lambda: clock[0])
    me, other = {"key_id": "k1"}, {"key_id": "k2"}

    async def main():
        await store.put("resp_old", {"response": {"id": "resp_old"}}, "k1")
        assert (await store.get("resp_old", me))["response"]["id"] == "resp_old"
        assert await store.get("resp_old", other) is None
        assert not await store.delete("resp_old", other)
        clock[0] += 86400 + 1
        assert await store.get("resp_old", me) is None          # expired: never served
        await store.put("resp_new", {"response": {}}, None)     # and deleted at the next write
        assert await store.get("resp_new", other) is not None
    trio.run(main)
    store.close()
    db = sqlite3.connect(tmp_path / "responses.db")
    assert [r[0] for r in db.execute("SELECT id FROM responses")] == ["resp_new"]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
