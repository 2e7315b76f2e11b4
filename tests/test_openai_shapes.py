"""Our responses validate against OpenAI's own response schemas
(../shared/data/openai-openapi.json, components/schemas), streamed chunks included.

The document is OpenAPI 3.1 with OpenAPI 3.0's `nullable: true` mixed in; the validator
here honours `nullable` by widening such a schema to also accept null."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests import openai_spec

CHAT = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def validate():
    doc = openai_spec.nullable(openai_spec.load())
    registry = Registry().with_resource(
        "urn:openai", Resource.from_contents(doc, default_specification=DRAFT202012))

    def check(obj, name: str) -> None:
        schema = {"$ref": f"urn:openai#/components/schemas/{name}"}
        jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)
    return check


def test_the_validator_can_fail(validate) -> None:
    """system_fingerprint: null, which this node sent before, is not what the spec allows."""
    with pytest.raises(jsonschema.ValidationError):
        validate({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                  "choices": [], "system_fingerprint": None}, "CreateChatCompletionResponse")


def test_chat_completion_and_its_chunks(node, validate) -> None:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "logprobs": True, "top_logprobs": 2}
    r = httpx.post(node.v1 + "/chat/completions", json=body, timeout=60)
    validate(r.json(), "CreateChatCompletionResponse")
    with httpx.stream("POST", node.v1 + "/chat/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert len(chunks) > 2
    for c in chunks:
        validate(c, "CreateChatCompletionStreamResponse")


def test_completion_embedding_models_and_transcription(node, validate, speech_wav) -> None:
    r = httpx.post(node.v1 + "/completions", timeout=60, json={
        "model": CHAT, "prompt": "1, 2,", "max_tokens": 4, "logprobs": 2})
    validate(r.json(), "CreateCompletionResponse")
    r = httpx.post(node.v1 + "/embeddings", json={"model": CHAT, "input": ["a", "b"]}, timeout=60)
    validate(r.json(), "CreateEmbeddingResponse")
    validate(httpx.get(node.v1 + "/models", timeout=10).json(), "ListModelsResponse")
    with open(speech_wav, "rb") as fh:
        r = httpx.post(node.v1 + "/audio/transcriptions", timeout=60,
                       data={"model": "whisper-1"}, files={"file": fh})
    validate(r.json(), "CreateTranscriptionResponseJson")
    err = httpx.post(node.v1 + "/chat/completions", json={"model": "nope", "messages": []}, timeout=10)
    validate(err.json(), "ErrorResponse")
