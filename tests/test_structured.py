"""Structured outputs and logprobs through the official openai client and instructor,
on the shared test node (SmolLM2): grammar-constrained output always parses and validates."""

from __future__ import annotations

import json
import math
import threading

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

CHAT = "smollm2-135m-instruct"

NAME = {"type": "string", "minLength": 1, "maxLength": 16}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "city": NAME, "weather": {"enum": ["sunny", "rainy", "cloudy"]},
        "temps": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}},
     "required": ["city", "weather", "temps"], "additionalProperties": False},
    {"type": "object", "properties": {
        "owner": {"$ref": "#/$defs/person"},
        "pets": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "name": NAME},
            "required": ["kind", "name"], "additionalProperties": False}}},
     "required": ["owner", "pets"], "additionalProperties": False,
     "$defs": {"person": {"type": "object", "properties": {"name": NAME, "adult": {"type": "boolean"}},
                          "required": ["name", "adult"], "additionalProperties": False}}},
    {"type": "object", "properties": {"answer": {"type": ["integer", "null"]},
                                      "unit": {"const": "cm"}},
     "required": ["answer", "unit"], "additionalProperties": False},
]
PROMPTS = ["Describe a person.", "What is the weather like?", "Tell me about a pet owner.",
           "How tall is a door?", "Give me an example."]


def _fmt(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_twenty_strict_json_schema_requests_parse_and_validate(client) -> None:
    n = 0
    for i in range(20):
        schema = SCHEMAS[i % len(SCHEMAS)]
        r = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=250, temperature=0.7, seed=i, response_format=_fmt(schema))
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
        n += 1
    assert n == 20


def test_json_object_mode_gives_an_object(client) -> None:
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "List three colours in JSON."}],
        max_tokens=120, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:                    # cut by max_tokens: still the start of an object, never prose
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_a_schema_keyword_outside_the_subset_is_a_400_naming_it(client) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "x"}],
            response_format=_fmt({"type": "object", "properties": {
                "n": {"type": "integer", "minimum": 3}}}))
    err = ei.value.body
    assert err["code"] == "unsupported_schema_keyword" and "'minimum'" in err["message"]
    assert "/properties/n" in err["message"] and err["param"].startswith("response_format")


def test_constrained_and_free_streams_batched_give_each_its_solo_output(client) -> None:
    free = dict(model=CHAT, messages=[{"role": "user", "content": "Write a haiku about rain."}],
                max_tokens=40, temperature=0)
    constrained = dict(model=CHAT, messages=[{"role": "user", "content": PROMPTS[1]}],
                       max_tokens=120, temperature=0, response_format=_fmt(SCHEMAS[1]))

    def streamed(kw) -> str:
        return "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kw) if c.choices)

    alone = [streamed(free), streamed(constrained)]
    together: list[str | None] = [None, None]

    def run(i, kw):
        together[i] = streamed(kw)
    threads = [threading.Thread(target=run, args=(i, kw))
               for i, kw in enumerate((free, constrained))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone
    jsonschema.validate(json.loads(alone[1]), SCHEMAS[1])
    assert not alone[0].lstrip().startswith("{")


def test_chat_logprobs_are_present_sorted_and_consistent(client) -> None:
    kw = dict(model=CHAT, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
              temperature=0, logprobs=True, top_logprobs=5)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert t.logprob <= 0 and sum(math.exp(x) for x in tops) <= 1 + 1e-6
        assert t.token == t.top_logprobs[0].token and t.logprob == tops[0]   # greedy
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    streamed = [lp for c in client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_top_logprobs_without_logprobs_is_a_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2)
    assert "top_logprobs" in ei.value.body["message"]


def test_completion_logprobs_in_the_legacy_shape(client) -> None:
    r = client.completions.create(model=CHAT, prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                  logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert text.startswith("1, 2, 3,") and "".join(lp.tokens) == text[len("1, 2, 3,"):]
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == len("1, 2, 3,")
    assert all(len(t) == 2 and max(t.values()) == v for t, v in zip(lp.top_logprobs, lp.token_logprobs))


class Pet(BaseModel):
    kind: str = Field(json_schema_extra={"enum": ["cat", "dog"]})
    name: str = Field(max_length=16)


class Owner(BaseModel):
    name: str = Field(max_length=16)
    age: int
    pets: list[Pet] = Field(max_length=2)


@pytest.mark.parametrize("mode", ["JSON_SCHEMA"])
def test_instructor_extracts_a_pydantic_model(node, mode) -> None:
    instructor = pytest.importorskip("instructor")
    raw = openai.OpenAI(base_url=node.v1, api_key="unused", max_retries=0, timeout=120)
    client = instructor.from_openai(raw, mode=getattr(instructor.Mode, mode))
    owner = client.chat.completions.create(
        model=CHAT, response_model=Owner, max_retries=0, max_tokens=200, temperature=0,
        messages=[{"role": "user", "content": "Anna is 34 and has a cat called Tom."}])
    assert isinstance(owner, Owner) and owner.name and all(p.kind in ("cat", "dog") for p in owner.pets)


def test_logit_bias_steers_and_bans_tokens(client) -> None:
    from llama_cpp import Llama

    from gallery.store import Store
    from tests.procs import models_dir
    vocab = Llama(str(Store(models_dir()).get(CHAT).path), vocab_only=True, verbose=False)
    prompt = dict(model=CHAT, prompt="My favourite fruit is", max_tokens=1, temperature=0,
                  logprobs=1)
    first = client.completions.create(**prompt).choices[0].logprobs.tokens[0]
    first_id = vocab.tokenize(first.encode(), add_bos=False, special=True)[0]
    banned = client.completions.create(**prompt, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.tokens[0] != first
    forced_id = vocab.tokenize(b" banana", add_bos=False, special=False)[0]
    forced = client.completions.create(**prompt, logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == vocab.detokenize([forced_id]).decode()
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(**prompt, logit_bias={"999999999": 1})
    assert ei.value.body["param"] == "logit_bias"
