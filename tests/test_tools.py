"""Function calling with the official openai client and instructor, on a node serving
Qwen2.5-Coder-0.5B-Instruct (installed from the package index: 6 wheel parts joined)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.procs import MeshNode

QWEN = "qwen2.5-coder-0.5b-instruct"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
        "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "Current weather in a city"}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME,
                                           "description": "Current time in a timezone"}}]
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    n = MeshNode(tmp_path_factory.mktemp("tools"), ["--name", "t", "--no-mdns", "--model", QWEN])
    n.start()
    try:
        n.wait_ready()
        yield openai.OpenAI(base_url=n.v1, api_key="unused", max_retries=0, timeout=300), n
    finally:
        n.stop()


def _args(call, schema):
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schema)
    return args


def test_a_named_tool_call_has_valid_arguments(qwen) -> None:
    client, _ = qwen
    r = client.chat.completions.create(
        model=QWEN, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert _args(call, WEATHER)["unit"] == "celsius"


def test_required_picks_a_declared_tool_with_valid_arguments(qwen) -> None:
    client, _ = qwen
    r = client.chat.completions.create(
        model=QWEN, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200,
        parallel_tool_calls=False,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}])
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    _args(call, TIME if call.function.name == "get_time" else WEATHER)


def test_a_two_turn_tool_conversation(qwen) -> None:
    client, _ = qwen
    first = client.chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS,
                                           tool_choice="required", temperature=0,
                                           max_tokens=120, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    final = client.chat.completions.create(model=QWEN, messages=history, tools=TOOLS,
                                           tool_choice="none", temperature=0, max_tokens=60)
    choice = final.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert "18" in choice.message.content          # the answer uses the tool's result


def test_streamed_tool_call_deltas_reassemble_into_the_same_call(qwen) -> None:
    client, _ = qwen
    kw = dict(model=QWEN, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"name": "", "arguments": ""})
            c["name"] += d.function.name or ""
            c["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert calls == {0: {"name": whole.function.name, "arguments": whole.function.arguments}}


def test_auto_lets_the_model_call_a_tool(qwen) -> None:
    client, _ = qwen          # auto is the default when tools are given
    r = client.chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS, temperature=0,
                                       max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert "paris" in _args(call, WEATHER)["city"].lower()


def test_auto_lets_the_model_answer_in_text(qwen) -> None:
    client, _ = qwen
    r = client.chat.completions.create(
        model=QWEN, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": "Say hello to Ada in one short sentence."}])
    choice = r.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert "Ada" in choice.message.content and "<tool_call>" not in choice.message.content


def test_auto_streamed_gives_the_same_call_and_no_tag_text(qwen) -> None:
    client, _ = qwen
    kw = dict(model=QWEN, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    text, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        text += d.content or ""
        for t in d.tool_calls or []:
            calls.setdefault(t.index, [t.function.name, t.function.arguments])
    assert finish == "tool_calls" and "<tool_call>" not in text
    assert calls == {0: [whole.function.name, whole.function.arguments]}


def test_unsupported_tool_requests_are_400s_naming_the_field(qwen) -> None:
    client, _ = qwen
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}]
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=QWEN, messages=ASK, tools=bad, tool_choice="required")
    assert "'minimum'" in ei.value.body["message"] and ei.value.body["param"].startswith("tools[0]")
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert ei.value.body["param"] == "tool_choice"


class Weather(BaseModel):
    city: str = Field(max_length=40)
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


def test_instructor_tools_mode(qwen) -> None:
    instructor = pytest.importorskip("instructor")
    client, node = qwen
    raw = openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=300)
    out = instructor.from_openai(raw, mode=instructor.Mode.TOOLS).chat.completions.create(
        model=QWEN, response_model=Weather, max_retries=0, temperature=0, max_tokens=120,
        messages=ASK)
    assert isinstance(out, Weather) and "Paris" in out.city and out.unit == "celsius"
