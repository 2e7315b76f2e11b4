"""Prefix affinity without processes: the chain of a conversation (mesh/prefix.py), the
book of what a node's slots hold, and the router's rule (mesh/router.py, Affinity)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from mesh.prefix import PrefixBook, chain, next_link, saved
from mesh.router import PeerCandidate, Router
from mesh.wire.inference import Generate, Message, ToolCall

SYSTEM = Message(role="system", content="You are a helpful assistant. " * 20)


def turn(*texts: str) -> Generate:
    msgs = [SYSTEM]
    for i, t in enumerate(texts):
        msgs.append(Message(role="user" if i % 2 == 0 else "assistant", content=t))
    return Generate(model="m", messages=tuple(msgs))


def test_the_next_turn_passes_through_the_reply_link() -> None:
    first = turn("What is a mesh? " * 10)
    link = next_link(first, "A mesh is many nodes. " * 10)
    second = turn("What is a mesh? " * 10, "A mesh is many nodes. " * 10, "And a node?")
    hashes = [h for h, _ in chain(second)]
    assert link == hashes[2]                            # system, user, assistant
    assert chain(first) == chain(second)[:2]            # the shared start hashes the same
    # another reply is another conversation from there on
    assert next_link(first, "Something else.") not in hashes
    # tool calls are part of the assistant message the client sends back
    call = ToolCall(id="c1", name="f", arguments='{"x": 1}')
    assert next_link(first, "", [call]) != next_link(first, "")
    # a completion prompt's blocks: the prompt plus its reply is the next prompt's start
    p = Generate(model="m", prompt="x" * 300)
    cont = Generate(model="m", prompt="x" * 300 + "y" * 300 + "more")
    assert next_link(p, "y" * 300) == [h for h, _ in chain(cont)][1]


def test_saved_is_the_deepest_held_link_in_tokens() -> None:
    links = chain(turn("a" * 400, "b" * 400, "c"))
    held = frozenset({links[0][0], links[2][0]})
    assert saved(links, held) == links[2][1] > links[0][1] > 0
    assert saved(links, frozenset()) == 0


def test_the_book_keeps_one_entry_per_conversation_and_as_many_as_slots() -> None:
    book = PrefixBook()
    convs = [turn(f"conversation {i} " * 30) for i in range(3)]
    for c in convs:
        book.served("m", 2, chain(c), next_link(c, "reply"))
    held = book.held("m")
    assert next_link(convs[0], "reply") not in held       # 2 slots: the oldest went
    assert {next_link(c, "reply") for c in convs[1:]} <= held
    # the next turn of conversation 2 replaces its previous turn, not another conversation
    nxt = turn("conversation 2 " * 30, "reply", "more")
    book.served("m", 2, chain(nxt), next_link(nxt, "again"))
    held = book.held("m")
    assert next_link(convs[1], "reply") in held and next_link(nxt, "again") in held
    assert next_link(convs[2], "reply") not in held      # the older turn's entry, replaced
    book.forget("m")
    assert book.held("m") == frozenset()


@dataclass
class Local:
    slots: int = 4
    in_flight: int = 0
    background: int = 0
    held: frozenset = frozenset()
    id: str = "m"
    backend: str = "llama"
    state: str = "loaded"

    def find(self, model):
        return self if model == "m" else None

    def model_cards(self):
        return [{"id": "m"}]

    def prefixes(self, model_id):
        return self.held

    @asynccontextmanager
    async def open(self, model_id, request):
        yield iter(())


@dataclass
class Peers:
    cands: list = field(default_factory=list)

    def candidates(self, model):
        return self.cands

    def model_cards(self):
        return []


def cand(name, busy=0, slots=4, prefixes=()):
    return PeerCandidate(peer_id=name, name=name, model="m", slots=slots, busy=busy, queued=0,
                         tokens_per_s=50.0, rtt_ms=1.0, prefixes=frozenset(prefixes))


def test_a_peer_holding_the_conversation_goes_first_when_load_is_even() -> None:
    req = turn("q " * 200, "a " * 200, "next")
    links = chain(req)
    deep = links[-2][0]                                  # it holds up to the reply
    local = Local()
    r = Router(local=local, peers=Peers([cand("b"), cand("c", prefixes={deep})]), transport=object())
    plan = r.plan("m", links=links)
    assert plan[0].name == "c" and plan[0].reason.startswith("prefix") and plan[-1].name == "local"
    # without affinity: the local node with a free slot, as before
    r.affinity = False
    assert [t.name for t in r.plan("m", links=links)] == ["local"]
    r.affinity = True
    # we hold it ourselves: stay
    local.held = frozenset({deep})
    assert [t.name for t in r.plan("m", links=links)] == ["local"]
    local.held = frozenset()
    # uneven load: the holder is saturated (or would be, counting what we sent it)
    r.peers = Peers([cand("b"), cand("c", busy=4, prefixes={deep})])
    assert [t.name for t in r.plan("m", links=links)] == ["local"]
    r.peers = Peers([cand("b"), cand("c", busy=3, prefixes={deep})])
    r.in_flight_to["c"] = 1
    assert [t.name for t in r.plan("m", links=links)] == ["local"]
    r.in_flight_to.clear()
    # a free slot, but much busier than the least busy node: least busy wins
    r.peers = Peers([cand("b"), cand("c", busy=3, slots=4, prefixes={deep})])
    assert r.plan("m", links=links)[0].name == "local"
    # too little to save: a one-word prompt is below MIN_SAVED
    small = chain(Generate(model="m", messages=(Message(role="user", content="hi"),)))
    r.peers = Peers([cand("c", prefixes={small[0][0]})])
    assert [t.name for t in r.plan("m", links=small)] == ["local"]


def test_with_no_local_model_the_holder_beats_the_least_busy() -> None:
    req = turn("q " * 200, "a " * 200, "next")
    links = chain(req)
    r = Router(local=Local(state="stopped"), transport=object(),
               peers=Peers([cand("b"), cand("c", busy=1, prefixes={links[-2][0]})]))
    assert [t.name for t in r.plan("m", links=links)] == ["c", "b"]
    assert [t.name for t in r.plan("m")] == ["b", "c"]
