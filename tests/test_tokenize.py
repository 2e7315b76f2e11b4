"""llama-server's /tokenize and /detokenize, for any model of the mesh."""

from __future__ import annotations

import httpx

CHAT = "smollm2-135m-instruct"


def _post(node, path, body):
    return httpx.post(node.api + path, json=body, timeout=60)


def test_tokens_round_trip_with_pieces(node) -> None:
    text = "Hello, mesh! ünïcode"
    r = _post(node, "/tokenize", {"model": CHAT, "content": text, "with_pieces": True})
    assert r.status_code == 200, r.text
    toks = r.json()["tokens"]
    assert len(toks) > 3 and all(isinstance(t["id"], int) for t in toks)
    # a piece is its text, or its bytes where they are not valid UTF-8 alone
    raw = b"".join(t["piece"].encode() if isinstance(t["piece"], str) else bytes(t["piece"])
                   for t in toks)
    assert raw.decode() == text
    ids = [t["id"] for t in toks]
    assert _post(node, "/tokenize", {"model": CHAT, "content": text}).json()["tokens"] == ids
    back = _post(node, "/detokenize", {"model": CHAT, "tokens": ids})
    assert back.status_code == 200 and back.json()["content"] == text
    special = _post(node, "/tokenize", {"model": CHAT, "content": text, "add_special": True})
    assert len(special.json()["tokens"]) >= len(ids)


def test_a_chat_prompt_counts_what_a_chat_request_uses(node, client) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name three colours."}]
    n = len(_post(node, "/tokenize", {"model": CHAT, "messages": messages}).json()["tokens"])
    r = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=1)
    assert n == r.usage.prompt_tokens


def test_errors_name_what_is_wrong(node) -> None:
    r = _post(node, "/tokenize", {"content": "hi"})           # two models: which one?
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = _post(node, "/tokenize", {"model": "no-such-model", "content": "hi"})
    assert r.status_code == 404
    r = _post(node, "/detokenize", {"model": CHAT, "tokens": [10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = _post(node, "/tokenize", {"model": CHAT, "content": "a", "messages": []})
    assert r.status_code == 400
    r = _post(node, "/tokenize", {"model": CHAT, "text": "a"})
    assert r.status_code == 400 and "text" in r.json()["error"]["message"]
    r = _post(node, "/tokenize", {"model": "whisper-tiny.en", "content": "a"})
    assert r.status_code == 400
