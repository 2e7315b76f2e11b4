"""`n` > 1: several choices from one prompt (its KV computed once and copied to each
choice's sequence), choice i sampled with seed + i; through the official openai client."""

from __future__ import annotations

import openai
import pytest

MODEL = "smollm2"
ASK = [{"role": "user", "content": "Name a colour and say why you like it."}]


def _one(client, seed: int, **kw) -> str:
    r = client.chat.completions.create(model=MODEL, messages=ASK, n=1, seed=seed, **kw)
    return r.choices[0].message.content


def test_each_choice_is_what_its_own_seed_gives_alone(client) -> None:
    kw = dict(temperature=1.0, max_tokens=24)
    r = client.chat.completions.create(model=MODEL, messages=ASK, n=3, seed=40, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert all(texts) and len(set(texts)) > 1          # different seeds, different answers
    assert texts == [_one(client, 40 + i, **kw) for i in range(3)]
    alone = client.chat.completions.create(model=MODEL, messages=ASK, seed=40, **kw)
    assert r.usage.prompt_tokens == alone.usage.prompt_tokens        # the prompt, once
    assert r.usage.completion_tokens >= 3 * 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_choices_reassemble_per_index(client) -> None:
    kw = dict(model=MODEL, messages=ASK, n=2, seed=5, temperature=0.9, max_tokens=20)
    whole = client.chat.completions.create(**kw)
    texts, finish = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}


def test_completions_take_n_too(client) -> None:
    r = client.completions.create(model=MODEL, prompt="The sky is", n=2, seed=3,
                                  temperature=1.0, max_tokens=8)
    assert sorted(c.index for c in r.choices) == [0, 1] and all(c.text for c in r.choices)


def test_more_choices_than_parallel_sequences_is_a_400_naming_n(client) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=ASK, n=16, max_tokens=4)
    assert ei.value.body["param"] == "n"
