"""Prefix affinity: which node's slots already hold the start of a request's prompt.

Design note. A worker keeps each slot's KV cache after a request and gives a new request
the slot sharing the longest token prefix with its prompt (node/backends/batching.py,
"Prompt cache"), so the next turn of a conversation costs only its new tokens, on the
node that served the last turn. The router cannot tokenize (that needs the model and its
chat template), so the mesh speaks of prefixes in text:

- A request's *chain* is a list of (hash, tokens) at each point a later request could
  share its start: after each message of a chat (the hash of every message up to it,
  role, content, name, tool calls and tool call id included), or after each full
  ``BLOCK``-character block of a completion prompt. ``tokens`` estimates the prompt
  tokens up to that point (``CHARS_PER_TOKEN``, plus the chat template's few tokens a
  message), enough to weigh the prefill it would save.
- A node that served a generation records its chain and the chain's next link, the
  reply: the next turn's messages are this turn's plus the assistant message carrying
  the reply, so the next turn's chain passes through that hash (``PrefixBook``). It
  keeps as many conversations per model as the model has slots (a newer turn of the same
  conversation replaces the older one, as it does in the slot) and gossips, for each,
  its first link and its last two: ~9 bytes a hash, ``3 * slots`` hashes a model.
- The router looks up the deepest link of the request's chain in each candidate's set:
  that candidate would re-use about that many tokens (mesh/router.py, "Affinity").

What it cannot see: the slot a worker reused for another request since (the gossip
lags up to one heartbeat and the book is a model of the slots, not the slots); a
conversation whose client edits history (its chain diverges where the edit is, and the
shared start still matches). A wrong guess costs what least-busy routing costs: a full
prefill somewhere.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable, Sequence

from mesh.wire.inference import Generate, Message

__all__ = ["BLOCK", "CHARS_PER_TOKEN", "chain", "next_link", "saved", "PrefixBook"]

BLOCK = 256                # characters a completion-prompt block holds
CHARS_PER_TOKEN = 4.0      # estimate (English text with a BPE vocabulary: 3.5-4.5)
MESSAGE_TOKENS = 4         # a chat template's tokens around a message (role, separators)
_SEED = b"mesh/prefix/1"

Chain = list[tuple[int, int]]


def _h(prev: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(prev + data, digest_size=8).digest()


def _int(h: bytes) -> int:
    return int.from_bytes(h, "big") >> 1          # 63 bits: a msgpack/int64-safe integer


def _message_bytes(m: Message) -> bytes:
    calls = "\x1e".join(f"{c.name}\x1d{c.arguments}" for c in m.tool_calls)
    return "\x1f".join((m.role, m.content, m.name or "", calls, m.tool_call_id or "")).encode()


def _chat_chain(messages: Iterable[Message]) -> tuple[Chain, bytes, int]:
    out: Chain = []
    h, tokens = _SEED, 0
    for m in messages:
        data = _message_bytes(m)
        h = _h(h, data)
        tokens += MESSAGE_TOKENS + int(len(m.content) / CHARS_PER_TOKEN)
        out.append((_int(h), tokens))
    return out, h, tokens


def _text_chain(text: str) -> Chain:
    out: Chain = []
    h = _SEED
    for i in range(0, len(text) - BLOCK + 1, BLOCK):
        h = _h(h, text[i:i + BLOCK].encode())
        out.append((_int(h), int((i + BLOCK) / CHARS_PER_TOKEN)))
    return out


def chain(req: Generate) -> Chain:
    """The request's prefix chain, shallowest first (module note)."""
    if req.messages is not None:
        return _chat_chain(req.messages)[0]
    return _text_chain(req.prompt or "")


def next_link(req: Generate, reply: str, tool_calls: Sequence = ()) -> int | None:
    """The hash a follow-up request passes through if it carries this reply: the chat's
    chain extended by the assistant message, or the prompt's blocks with the reply
    appended (its last full block). None when the reply adds no link."""
    if req.messages is not None:
        _, h, _ = _chat_chain(req.messages)
        m = Message(role="assistant", content=reply, tool_calls=tuple(tool_calls))
        return _int(_h(h, _message_bytes(m)))
    full = _text_chain((req.prompt or "") + reply)
    return full[-1][0] if len(full) > len(req.prompt or "") // BLOCK else None


def saved(links: Chain, held: frozenset[int] | set[int]) -> int:
    """Estimated prompt tokens a node holding `held` would not recompute."""
    if not held:
        return 0
    for h, tokens in reversed(links):
        if h in held:
            return tokens
    return 0


class PrefixBook:
    """Per model, the conversations this node's slots hold, newest last (module note)."""

    def __init__(self) -> None:
        self._models: dict[str, OrderedDict[int, tuple[int, ...]]] = {}
        self._held: dict[str, frozenset[int]] = {}

    def served(self, model: str, slots: int, links: Chain, reply: int | None) -> None:
        hashes = [h for h, _ in links] + ([reply] if reply is not None else [])
        if not hashes:
            return
        book = self._models.setdefault(model, OrderedDict())
        seen = set(hashes)
        for key in [k for k in book if k in seen]:      # an earlier turn of this one
            del book[key]
        book[hashes[-1]] = tuple(dict.fromkeys((hashes[0], *hashes[-2:])))
        while len(book) > max(1, slots):
            book.popitem(last=False)
        self._held.pop(model, None)

    def held(self, model: str) -> frozenset[int]:
        got = self._held.get(model)
        if got is None:
            book = self._models.get(model) or {}
            got = self._held[model] = frozenset(h for hs in book.values() for h in hs)
        return got

    def forget(self, model: str) -> None:
        """The model was unloaded: its slots hold nothing."""
        self._models.pop(model, None)
        self._held.pop(model, None)
