"""mesh/router.py on a fake local backend and fake peers (no processes, a fake clock)."""

from __future__ import annotations

from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from mesh.errors import BadRequest, ModelNotFound, NoCapacity, PeerSilent, Timeout
from mesh.router import PeerCandidate, Router
from mesh.wire.inference import (Delta, Done, Failed, Generate, Heartbeat, Message,
                                 decode_request, encode_request)

REQ = Generate(model="m", messages=(Message(role="user", content="hi"),))


@dataclass
class FakeModel:
    id: str = "m"
    backend: str = "llama"
    state: str = "loaded"
    slots: int = 2
    in_flight: int = 0
    background: int = 0


@dataclass
class FakeLocal:
    """A LocalBackend whose `open` plays a script of events (or raises, or hangs)."""
    model: FakeModel | None = field(default_factory=FakeModel)
    script: list[Any] = field(default_factory=lambda: [Delta(text="local"), Done()])
    opened: int = 0
    held: frozenset = frozenset()

    def prefixes(self, model_id: str) -> frozenset:
        return self.held

    def find(self, model: str):
        return self.model if self.model and model == self.model.id else None

    def model_cards(self):
        return [{"id": self.model.id, "object": "model"}] if self.model else []

    @asynccontextmanager
    async def open(self, model_id, request):
        self.opened += 1
        yield _play(self.script)


async def _play(script):
    for item in script:
        if item == "hang":
            await trio.sleep_forever()
        if isinstance(item, BaseException):
            raise item
        yield item


def peer(pid: str, *, busy=0, queued=0, slots=1, tps=0.0, rtt=1.0, backend="llama",
         last_seen=0.0, prefixes=frozenset()) -> PeerCandidate:
    return PeerCandidate(peer_id=pid, name=pid, model="m", slots=slots, busy=busy,
                         queued=queued, tokens_per_s=tps, rtt_ms=rtt, backend=backend,
                         last_seen=last_seen, prefixes=frozenset(prefixes))


@dataclass
class FakePeers:
    cands: list[PeerCandidate]

    def candidates(self, model):
        return [c for c in self.cands if c.model == model]

    def model_cards(self):
        return [{"id": c.model, "object": "model"} for c in self.cands]


@dataclass
class FakeTransport:
    """Each peer id maps to a script, or to an exception raised on open."""
    scripts: dict[str, Any]
    opened: list[str] = field(default_factory=list)

    @asynccontextmanager
    async def open(self, p, request, *, caller, deadline):
        self.opened.append(p.peer_id)
        script = self.scripts[p.peer_id]
        if isinstance(script, BaseException):
            raise script
        yield _play(script)


def router(local=None, cands=(), scripts=None, timeout=600.0) -> Router:
    return Router(local=local or FakeLocal(), peers=FakePeers(list(cands)),
                  transport=FakeTransport(scripts or {}), request_timeout=timeout)


def names(targets) -> list[str]:
    return [t.name for t in targets]


# ------------------------------------------------------------------ ranking
def test_peers_rank_by_wait_then_speed_then_rtt() -> None:
    r = router(local=FakeLocal(model=None), cands=[
        peer("busy", busy=1, slots=1),                 # wait 1.0
        peer("queued", queued=1, slots=2),             # wait 0.5
        peer("slow", tps=10, rtt=0.5),                 # wait 0, slower
        peer("fast-far", tps=50, rtt=9.0),             # wait 0, fastest, far
        peer("fast-near", tps=50, rtt=2.0),            # wait 0, fastest, near
    ])
    assert names(r.plan("m")) == ["fast-near", "fast-far", "slow", "queued", "busy"]
    r.in_flight_to["fast-near"] = 1                    # what we sent, gossip not yet showing
    assert names(r.plan("m"))[:2] == ["fast-far", "slow"]


def test_two_choices_spreads_requests_over_equal_free_peers_only() -> None:
    """Herding (mesh/router.py): among >2 free peers of about the same cost the first
    place is the better of two drawn at random; a full peer, or one much slower than a
    free one, never goes first."""
    cands = [peer(f"p{i}", tps=50, rtt=1.0 + i, slots=2) for i in range(4)]
    cands += [peer("full", busy=2, slots=2, tps=90), peer("slow", tps=5)]
    r = router(local=FakeLocal(model=None), cands=cands)
    r.rng.seed(7)
    firsts = Counter(names(r.plan("m"))[0] for _ in range(400))
    # each of the 4 equal peers is drawn; the worst of them (by RTT) never wins a draw
    assert set(firsts) == {"p0", "p1", "p2"}, firsts
    assert firsts["p0"] > firsts["p1"] > firsts["p2"] > 0, firsts
    # the fallbacks are every candidate, in the plain ranking's order after the first
    order = names(r.plan("m"))
    assert sorted(order) == sorted(c.name for c in cands) and order[-2:] == ["slow", "full"]
    # a peer 3x faster than the rest goes first whenever it has a free slot
    fast = peer("fast", tps=150, rtt=5.0)
    r2 = router(local=FakeLocal(model=None), cands=[*cands, fast])
    assert {names(r2.plan("m"))[0] for _ in range(100)} == {"fast"}
    r2.in_flight_to["fast"] = 1                      # its only slot: now the draw applies
    assert {names(r2.plan("m"))[0] for _ in range(200)} == {"p0", "p1", "p2"}
    # two equal free peers: the plain ranking (a draw of two of two is always the best)
    r3 = router(local=FakeLocal(model=None), cands=cands[:2])
    assert {names(r3.plan("m"))[0] for _ in range(100)} == {"p0"}


def test_local_first_while_it_has_a_free_slot() -> None:
    local = FakeLocal(model=FakeModel(slots=2, in_flight=1))
    r = router(local=local, cands=[peer("p", tps=99)])
    assert names(r.plan("m")) == ["local"]
    local.model.in_flight = 2                           # saturated: an idle peer goes first
    assert names(r.plan("m")) == ["p", "local"]
    r2 = router(local=local, cands=[peer("p", busy=3, slots=1)])   # peer worse than us
    assert names(r2.plan("m")) == ["local"]


def test_a_batch_line_leaves_the_kept_slot_and_goes_to_a_peer_with_room() -> None:
    local = FakeLocal(model=FakeModel(slots=4, in_flight=3))
    r = router(local=local, cands=[peer("p", busy=1, slots=4)])
    assert names(r.plan("m")) == ["local"]                    # interactive: the last slot
    assert names(r.plan("m", background=True)) == ["p", "local"]
    busy = router(local=local, cands=[peer("p", busy=4, slots=4)])
    assert names(busy.plan("m", background=True)) == ["local"]   # nobody has more room
    assert names(router(local=FakeLocal(model=FakeModel(slots=4, in_flight=2)),
                        cands=[peer("p")]).plan("m", background=True)) == ["local"]


def test_batch_lines_queued_here_do_not_turn_a_chat_away() -> None:
    """8 slots, 7 batch lines running and 2 queued (they never take the kept slot): a chat
    is admitted before the queued lines, into the free slot, so it stays here."""
    local = FakeLocal(model=FakeModel(slots=8, in_flight=9, background=9))
    r = router(local=local, cands=[peer("p", slots=8)])
    assert names(r.plan("m")) == ["local"]
    local.model.background = 0                 # 9 chats: saturated, the idle peer goes first
    assert names(r.plan("m")) == ["p", "local"]


def test_a_batch_line_goes_to_a_peer_that_surely_holds_fewer() -> None:
    """Lines sent just before a peer's latest state are in its busy count and in our
    unreflected ones: weighed by `wait` it looked fuller than this node (12/8 against
    9/8) and lines piled up here; by what it surely runs (7 of ours) it has room."""
    local = FakeLocal(model=FakeModel(slots=8, in_flight=9, background=9))
    p = peer("p", busy=5, slots=8, last_seen=10.0)
    r = router(local=local, cands=[p])
    r.in_flight_to["p"], r.sent_at["p"] = 7, [9.6, 9.7, 9.8, 9.9, 9.9, 10.0, 10.0]
    assert r.wait(p) == 1.5
    assert names(r.plan("m", background=True)) == ["p", "local"]
    r.in_flight_to["p"] = 9                    # it does hold more than we do: stay here
    assert names(r.plan("m", background=True)) == ["local"]


def test_our_requests_count_until_the_peers_gossip_can_show_them() -> None:
    """wait = (busy + queued + ours not yet in its gossip) / slots: a request sent 0.1 s
    before the peer's latest state is not in it; one sent 2 s before is in its busy."""
    p = peer("p", busy=2, slots=4, last_seen=10.0)
    r = router(local=FakeLocal(model=None), cands=[p])
    r.in_flight_to["p"] = 2
    r.sent_at["p"] = [8.0, 9.9]
    assert r.unreflected(p) == 1 and r.wait(p) == 0.75
    r.sent_at["p"] = [8.0]
    assert r.wait(p) == 0.5                       # the old sum said 1.0: twice the truth


def test_a_proxied_request_never_hops_again() -> None:
    r = router(local=FakeLocal(model=None), cands=[peer("p")])
    with pytest.raises(ModelNotFound) as ei:
        r.plan("m", proxied=True)
    assert "Available: m" in ei.value.message
    saturated = FakeLocal(model=FakeModel(slots=1, in_flight=5))
    assert names(router(local=saturated, cands=[peer("p")]).plan("m", proxied=True)) == ["local"]


def test_unknown_model_and_wrong_backend() -> None:
    r = router(cands=[peer("p", backend="whisper")])
    with pytest.raises(ModelNotFound):
        r.plan("nope")
    with pytest.raises(BadRequest) as ei:
        r.plan("m", kind="transcribe")          # the local model is a llama one
    assert ei.value.code == "model_not_supported"
    r2 = router(local=FakeLocal(model=None), cands=[peer("p", backend="whisper")])
    assert names(r2.plan("m", kind="transcribe")) == ["p"]
    with pytest.raises(BadRequest) as ei:     # a peer's malformed request: a 400 naming it
        decode_request({"kind": "transcribe", "model": "m", "audio": b"x", "temperature": 3.0})
    assert ei.value.param == "transcribe.temperature"
    assert decode_request(encode_request(REQ)) == REQ


# ---------------------------------------------------------------- dispatch
def run(fn):
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


async def collect(call) -> list[Any]:
    try:
        return [ev async for ev in call.events()]
    finally:
        await call.aclose()


def test_retry_before_the_first_event_then_quarantine_a_silent_peer() -> None:
    async def main():
        r = router(local=FakeLocal(model=FakeModel(in_flight=9, slots=1)),
                   cands=[peer("frozen", tps=9), peer("full", tps=5), peer("ok", tps=1)],
                   scripts={"frozen": PeerSilent("quiet"), "full": [Failed(
                       error="NoCapacity", message="queue full")],
                       "ok": [Heartbeat(), Delta(text="hi"), Done()]})
        call = await r.open(REQ)
        assert call.served_by == "ok"
        assert [type(e).__name__ for e in await collect(call)] == ["Delta", "Done"]
        assert r.transport.opened == ["frozen", "full", "ok"]
        assert r.in_flight_to == {"frozen": 0, "full": 0, "ok": 0}
        # the silent peer is out of routing until gossip shows a newer state
        assert "frozen" not in names(r.plan("m"))
        r.peers.cands[0] = peer("frozen", tps=9, last_seen=trio.current_time() + 1)
        assert names(r.plan("m"))[0] == "frozen"
    run(main)


def test_a_bad_request_is_the_answer_not_a_reason_to_retry() -> None:
    async def main():
        r = router(local=FakeLocal(model=None), cands=[peer("a", tps=2), peer("b")],
                   scripts={"a": [Failed(error="BadRequest", message="too long",
                                         param="messages", code="context_length_exceeded")],
                            "b": [Done()]})
        with pytest.raises(BadRequest) as ei:
            await r.open(REQ)
        assert ei.value.code == "context_length_exceeded" and ei.value.param == "messages"
        assert r.transport.opened == ["a"]
    run(main)


def test_all_candidates_fail_gives_the_last_error() -> None:
    async def main():
        r = router(local=FakeLocal(model=None), cands=[peer("a", tps=2), peer("b")],
                   scripts={"a": PeerSilent("a quiet"), "b": NoCapacity("b full")})
        with pytest.raises(NoCapacity, match="b full"):
            await r.open(REQ)
    run(main)


def test_deadline_before_and_after_the_first_event() -> None:
    async def main():
        r = router(local=FakeLocal(script=["hang"]), timeout=5)
        t0 = trio.current_time()
        with pytest.raises(Timeout) as ei:
            await r.open(REQ)
        assert trio.current_time() - t0 == pytest.approx(5) and ei.value.code == "deadline_exceeded"

        r = router(local=FakeLocal(script=[Delta(text="a"), "hang"]), timeout=5)
        call = await r.open(REQ)
        events = await collect(call)
        assert isinstance(events[0], Delta) and isinstance(events[-1], Failed)
        assert events[-1].error == "Timeout" and "deadline" in events[-1].message
    run(main)


def test_a_stream_cut_after_the_first_event_ends_with_failed() -> None:
    async def main():
        r = router(local=FakeLocal(model=None), cands=[peer("a")],
                   scripts={"a": [Delta(text="x"), PeerSilent("the serving node 'a' sent nothing")]})
        events = await collect(await r.open(REQ))
        assert [type(e).__name__ for e in events] == ["Delta", "Failed"]
        assert events[-1].error == "PeerSilent" and "sent nothing" in events[-1].message
    run(main)
