"""api/body.py SseTemplate: a pre-encoded text chunk is the same bytes as the chunk
encoded in full, whatever the text (the streams' shapes are checked against OpenAI's
OpenAPI document in tests/test_openai_shapes.py)."""

from __future__ import annotations

import json

import pytest

from api.body import TEXT, SseTemplate, sse

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def chat(text):
    return {**BASE, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                 "finish_reason": None}]}


def completion(text):
    return {**BASE, "object": "text_completion",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}]}


@pytest.mark.parametrize("shape", [chat, completion])
@pytest.mark.parametrize("text", ["hello", " world", "", 'a "quoted" \\ back\nslash\t',
                                  "\x00\x1f", "é ü 中文 😀 \u2028", TEXT, "data: x\n\n"])
def test_a_template_chunk_is_the_chunk_encoded_in_full(shape, text) -> None:
    got = SseTemplate(shape(TEXT))(text)
    assert got == sse(shape(text))
    assert json.loads(got.removeprefix(b"data: "))["choices"][0] == shape(text)["choices"][0]


def test_a_template_needs_the_marker_once() -> None:
    with pytest.raises(ValueError):
        SseTemplate(chat("no marker"))
