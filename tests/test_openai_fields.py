"""No parameter silently ignored: every field of OpenAI's chat and completion request
schemas (../shared/data/openai-openapi.json) is classified, and the node acts on it."""

from __future__ import annotations

import httpx
import pytest

from api.schemas import (CHAT_FIELDS, COMPLETION_FIELDS, ChatRequest, CompletionRequest)
from tests import openai_spec

CHAT = "smollm2-135m-instruct"


def spec_properties(name: str) -> set[str]:
    return openai_spec.properties(name)


@pytest.mark.parametrize("schema, table, model", [
    ("CreateChatCompletionRequest", CHAT_FIELDS, ChatRequest),
    ("CreateCompletionRequest", COMPLETION_FIELDS, CompletionRequest)])
def test_every_spec_field_is_classified_and_declared(schema, table, model) -> None:
    fields = spec_properties(schema)
    assert fields, "the spec walk found nothing"
    assert sorted(fields - set(table)) == [], "fields of the spec nobody classified"
    assert sorted(set(table) - set(model.model_fields)) == [], "classified but not declared"
    assert set(table.values()) <= {"honoured", "accepted", "refused"}


# a value that asks for something, per refused field
ASKS = {"tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "required", "functions": [{"name": "f"}], "function_call": "auto",
        "audio": {"voice": "alloy", "format": "wav"},
        "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
        "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low",
        "moderation": {"enabled": True}, "prompt_cache_options": {"ttl": 60},
        "best_of": 3, "suffix": " end"}
ACCEPTED = {"user": "u1", "metadata": {"k": "v"}, "store": True, "service_tier": "auto",
            "safety_identifier": "s", "prompt_cache_key": "c", "prompt_cache_retention": "24h",
            "parallel_tool_calls": True}


@pytest.mark.parametrize("path, table", [("/chat/completions", CHAT_FIELDS),
                                         ("/completions", COMPLETION_FIELDS)])
def test_refused_fields_are_a_400_naming_them_and_accepted_ones_pass(node, path, table) -> None:
    base = ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            if path == "/chat/completions" else {"model": CHAT, "prompt": "hi", "max_tokens": 1})
    for name, kind in table.items():
        if kind == "refused" and ASKS.get(name) is not None:
            r = httpx.post(node.v1 + path, json={**base, name: ASKS[name]}, timeout=60)
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["param"] == name and name in r.json()["error"]["message"]
        elif kind == "accepted":
            r = httpx.post(node.v1 + path, json={**base, name: ACCEPTED[name]}, timeout=60)
            assert r.status_code == 200, (name, r.text)
    r = httpx.post(node.v1 + path, json={**base, "not_an_openai_field": 1}, timeout=60)
    assert r.status_code == 400 and "not_an_openai_field" in r.json()["error"]["message"]


def test_tool_history_in_messages_is_checked(node) -> None:
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = httpx.post(node.v1 + "/chat/completions", timeout=60,
                   json={"model": CHAT, "max_tokens": 1, "messages": history})
    assert r.status_code == 200, r.text
    history[1]["tool_calls"][0].pop("id")
    r = httpx.post(node.v1 + "/chat/completions", timeout=60,
                   json={"model": CHAT, "max_tokens": 1, "messages": history})
    assert r.status_code == 400 and "tool_calls" in r.json()["error"]["message"]
