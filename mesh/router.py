"""Where a request goes, and the one call that takes it there: ``Router.open(request)``.

The API hands the router a typed request (mesh/wire/inference.py) and gets back a
``Call``: the first event, then an event stream. Behind it are two transports with one
shape, as httpx puts one transport interface in front of its connection pools:

    LocalBackend.open(model_id, request)            this node's worker processes (node/)
    PeerTransport.open(peer, request, caller, ...)  a mesh peer over /mesh/openai/2 (mesh/proxy.py)

each an async context manager yielding an iterator of events. The router never sees a
socket, a worker or HTTP.

Policy (``plan``):
1. A request already proxied to us is served here or fails: never a second hop.
2. The local node, when it has the model loaded (or loading) and is not saturated
   (in-flight below its slots, not counting batch lines queued past the slots they may
   hold: an interactive request goes before them; for background work, a batch line,
   in-flight below its slots less the one kept for interactive requests), or when no
   peer is expected to answer sooner (for a batch line: no peer surely holds less, by
   ``_lower_bound``).
3. Otherwise the routable peers that have it loaded, best first: the lowest expected
   wait, wait = (busy + queued + our in-flight to it that its gossip cannot show yet:
   sent less than REFLECT_S before its latest state) / slots, then the higher recent
   decode speed, then the lower RTT; the local node, if it has the model, comes last.
   Two choices (Mitzenmacher): where more than two peers have a free slot (in-flight
   counted) and cost about the same, the first is the better of two of them drawn at
   random, not always the one that looked idlest (see Herding).
4. A peer that went silent on us (``PeerSilent``: no heartbeat within SILENCE_S) is out
   of routing until gossip shows it alive again (a state newer than the silence), so a
   frozen peer costs one request at most ACK_S, not one per request for 3 s.
5. Nobody has it: ModelNotFound listing what the mesh does serve.

Affinity (mesh/prefix.py). A generation's prompt has a chain of prefix hashes; each node
gossips the ones its slots hold. Before rule 2, the candidate holding the most of the
prompt, if that is ``MIN_SAVED`` tokens more than this node holds, goes first when load
is even: it has a free slot (in-flight counted from dispatch) and its wait is within
``BALANCE`` of the least busy candidate's (SGLang's cache-aware rule: prefix when
balanced, least busy when not). Each target carries the reason it was chosen
(``Target.reason``: the API's ``x-mesh-route`` header, ``routes`` in /mesh/status).

Herding. Every node ranks the same gossiped loads, seconds old, the same way, so every
origin sends its next request to the one server that looked idlest, which fills while
the others idle: in the simulator (bench/sim, 100 nodes, docs/scale.md) 53% of remote
requests met a server with no free slot, against 30% for a server picked at random.
Drawing two and taking the better keeps most of ranking's gain and spreads the herd. It
is applied only where it costs nothing: among peers with a free slot (each starts the
request at once) whose expected time for a reference generation (``REF_TOKENS`` at its
gossiped decode speed, plus its RTT) is within ``NEAR`` (or ``SLACK_S``) of the best one's, so a node
much faster than the rest (a GPU among CPUs) still goes first while it has a slot, and
a full peer never goes before a free one. With two or fewer such peers the order is the
plain ranking: two draws of two would always pick the best.

Retries: before a request's first event, an error of ``mesh.errors.RETRYABLE`` (no
capacity, worker died, peer gone or silent) moves on to the next candidate; anything else
(a bad request, the deadline) is the answer. After the first event there is no retry:
the stream ends with a ``Failed`` event, never silently.

Deadline: one absolute deadline (``request_timeout`` from the node's config, or the one a
proxying peer sent) bounds the whole request, every candidate and every event; its
expiry is ``Timeout`` before the first event and a ``Failed(Timeout)`` after it.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, AsyncContextManager, AsyncIterator, Protocol

import trio

from mesh.errors import RETRYABLE, BadRequest, MeshError, ModelNotFound, PeerSilent, Timeout
from mesh.prefix import chain, saved
from mesh.wire.inference import (BACKEND_OF, Done, Event, Failed, Generate, Heartbeat,
                                 Request, Result, error_from_failed, failed_from_error)

log = logging.getLogger("mesh.router")

__all__ = ["LocalModel", "LocalBackend", "PeerCandidate", "PeerDirectory", "PeerTransport",
           "Target", "Router", "Call"]

DEFAULT_TIMEOUT = 600.0
DEFAULT_QUEUE_TIMEOUT = 30.0   # s an interactive generation may wait for a slot (llama-server
                               # queues without bound, Ollama answers 503 once its queue is
                               # full; a bound in time tells the client when to come back)
MIN_SAVED = 64                 # estimated prompt tokens a peer must hold beyond us to be preferred
BALANCE = 0.5                  # ... when its wait is within this of the least busy candidate's
REF_TOKENS = 128               # a reference generation, to weigh decode speed against RTT (Herding)
REFLECT_S = 0.5                # s after a dispatch from which a peer's gossiped state counts it
NEAR = 1.25                    # expected-time ratio within which free peers count as equal (Herding)
SLACK_S = 0.01                 # ... or this many seconds (RTTs alone: 1 ms and 3 ms are equal)


class LocalModel(Protocol):
    """What the router reads of a model this node runs (node/workers.py Worker)."""

    id: str
    backend: str
    state: str          # loading | loaded | failed | stopped
    slots: int
    in_flight: int
    background: int     # batch lines among in_flight


class LocalBackend(Protocol):
    """This node's models (node/local.py implements it over the worker pool)."""

    def find(self, model: str) -> LocalModel | None: ...
    def model_cards(self) -> list[dict[str, Any]]: ...
    def prefixes(self, model_id: str) -> frozenset[int]: ...
    def open(self, model_id: str, request: Request) -> AsyncContextManager[AsyncIterator[Event]]: ...


@dataclass(frozen=True)
class PeerCandidate:
    peer_id: str
    name: str
    model: str
    slots: int
    busy: int
    queued: int
    tokens_per_s: float
    rtt_ms: float
    backend: str = "llama"
    last_seen: float = 0.0        # trio clock of the peer's latest gossiped state
    prefixes: frozenset[int] = frozenset()   # prompt prefixes its slots hold (mesh/prefix.py)


class PeerDirectory(Protocol):
    """What the router needs from the membership (mesh/peers.py provides it)."""

    def candidates(self, model: str) -> list[PeerCandidate]: ...
    def model_cards(self) -> list[dict[str, Any]]: ...


class PeerTransport(Protocol):
    """Carries a request to one peer (mesh/proxy.py ProxyClient)."""

    def open(self, peer: PeerCandidate, request: Request, *, caller: dict[str, Any] | None,
             deadline: float) -> AsyncContextManager[AsyncIterator[Event]]: ...


@dataclass(frozen=True)
class Target:
    """One place a request may be served: this node (peer None) or a peer."""

    model: str
    peer: PeerCandidate | None = None
    reason: str = ""              # why it was chosen: local | prefix | least busy | ...

    @property
    def name(self) -> str:
        return self.peer.name if self.peer else "local"


@dataclass
class Call:
    """An opened request: its first event, then the rest through ``events()``.

    ``events()`` yields every event, the first included, ends after the terminal one and
    turns any failure (deadline, peer gone) into a final ``Failed``; ``aclose()`` ends the
    request wherever it runs (cancels a generation in the worker or on the peer)."""

    target: Target
    first: Event
    _events: AsyncIterator[Event]
    _stack: contextlib.AsyncExitStack
    deadline: float

    @property
    def served_by(self) -> str:
        return self.target.name

    async def events(self) -> AsyncIterator[Event]:
        ev = self.first
        while True:
            yield ev
            if isinstance(ev, (Done, Result, Failed)):
                return
            try:
                ev = await _next_event(self._events, self.deadline)
            except MeshError as exc:
                ev = failed_from_error(exc)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stack.aclose()


async def _next_event(events: AsyncIterator[Event], deadline: float) -> Event:
    with trio.move_on_at(deadline) as scope:
        while True:
            try:
                ev = await events.__anext__()
            except StopAsyncIteration:
                raise MeshError("the stream ended before its final event") from None
            if not isinstance(ev, Heartbeat):
                return ev
    assert scope.cancelled_caught
    raise Timeout("the request deadline passed before it finished", code="deadline_exceeded")


@dataclass
class Router:
    local: LocalBackend
    peers: PeerDirectory | None = None
    transport: PeerTransport | None = None
    request_timeout: float = DEFAULT_TIMEOUT
    queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT   # Generate.max_wait (interactive)
    in_flight_to: dict[str, int] = field(default_factory=dict)
    sent_at: dict[str, list[float]] = field(default_factory=dict)   # their dispatch times
    silent_since: dict[str, float] = field(default_factory=dict)
    affinity: bool = True         # prefix-affine routing (module note: Affinity)
    routes: Counter = field(default_factory=Counter)   # requests started, by Target.reason
    rng: random.Random = field(default_factory=random.Random)   # two choices (module note)

    # ------------------------------------------------------------- ranking
    def plan(self, model: str, *, proxied: bool = False, kind: str = "generate",
             links: list[tuple[int, int]] | None = None,
             background: bool = False) -> list[Target]:
        """Candidates for `model`, best first (module note: Policy, Affinity). `links`:
        the request's prefix chain (mesh/prefix.py chain). `background` (a batch line):
        this node is full one slot early, the one its worker keeps for interactive
        requests (node/backends/batching.py), so a line goes to a peer with room rather
        than queue here."""
        need = BACKEND_OF.get(kind)
        local = self.local.find(model)
        if local is not None and local.state in ("loading", "loaded"):
            _check_backend(local.id, local.backend, need)
            here = Target(model=local.id, reason="local")
            if proxied:
                return [replace(here, reason="for a peer")]   # the peer chose us: no hop
            if not self._meshed():
                return [here]
            remote = self.rank(local.id)
            if not remote:
                return [here]
            slots = max(local.slots, 1)
            if background:
                used, room = local.in_flight, max(slots - 1, 1)
                fuller = all(self._lower_bound(p) / max(p.slots, 1) >= used / slots
                             for p in remote)
            else:
                # batch lines past the slots they may hold are queued behind this request
                used = local.in_flight - max(0, local.background - max(slots - 1, 1))
                room = slots
                fuller = all(self.wait(p) >= used / slots for p in remote)
            mine = used / slots
            others = [Target(model=p.model, peer=p, reason="least busy") for p in remote]
            if links and self.affinity:
                hit = self._affine(links, remote, saved(links, self.local.prefixes(local.id)), mine)
                if hit is not None:
                    return [hit, *(t for t in others if t.peer is not hit.peer), here]
            if used < room or fuller:
                return [here]
            return [*others, replace(here, reason="local, after the peers")]
        if not proxied and self._meshed():
            remote = self.rank(model)
            if remote:
                _check_backend(remote[0].model, remote[0].backend, need)
                others = [Target(model=p.model, peer=p, reason="least busy") for p in remote]
                if links and self.affinity:
                    hit = self._affine(links, remote, 0, None)
                    if hit is not None:
                        return [hit, *(t for t in others if t.peer is not hit.peer)]
                return others
        raise ModelNotFound(
            f"The model '{model}' does not exist or is not loaded on any node. "
            f"Available: {', '.join(sorted(c['id'] for c in self.model_cards())) or 'none'}",
            param="model")

    def _meshed(self) -> bool:
        return self.peers is not None and self.transport is not None

    def wait(self, p: PeerCandidate) -> float:
        return (p.busy + p.queued + self.unreflected(p)) / max(p.slots, 1)

    def _lower_bound(self, p: PeerCandidate) -> int:
        """What `p` surely runs or queues: the larger of its gossiped count (seconds old)
        and our requests in flight to it. Batch lines weigh a peer by this: the dispatching
        node sends most of them, and `wait`'s sum counts the ones sent just before its
        latest state twice, so a peer with room looked fuller than this node and lines
        piled up here, past the slot kept for interactive requests."""
        return max(p.busy + p.queued, self.in_flight_to.get(p.peer_id, 0))

    def unreflected(self, p: PeerCandidate) -> int:
        """Our requests in flight to `p` that its gossiped busy/queued cannot show yet:
        those sent less than REFLECT_S before its latest state arrived (the rest are in
        its counts; adding them again made a peer look twice as busy as it was). Without
        dispatch times (a test setting in_flight_to), all of them."""
        times = self.sent_at.get(p.peer_id)
        if times is None:
            return self.in_flight_to.get(p.peer_id, 0)
        return sum(1 for t in times if t + REFLECT_S > p.last_seen)

    def ranked(self, model: str) -> list[PeerCandidate]:
        """The routable peers serving `model` by (wait, -tokens/s, RTT): Policy 3 without
        the draw."""
        assert self.peers is not None
        cands = [p for p in self.peers.candidates(model)
                 if self.silent_since.get(p.peer_id, float("-inf")) < p.last_seen]
        return sorted(cands, key=lambda p: (self.wait(p), -p.tokens_per_s, p.rtt_ms))

    def rank(self, model: str) -> list[PeerCandidate]:
        """`ranked`, its first place drawn by two choices (module note: Herding)."""
        ranked = self.ranked(model)
        near = self._equals(ranked)
        if len(near) > 2:
            a, b = self.rng.sample(near, 2)
            ranked.insert(0, ranked.pop(min(a, b)))
        return ranked

    def _free(self, p: PeerCandidate) -> bool:
        return p.busy + p.queued + self.unreflected(p) < max(p.slots, 1)

    def _equals(self, ranked: list[PeerCandidate]) -> list[int]:
        """Indexes into `ranked` of the peers two choices draws from (module note: Herding):
        a free slot each, and an expected time within NEAR (or SLACK_S) of the best one's.
        Speeds not yet measured (0) are only ever equal to each other."""
        free = [i for i, p in enumerate(ranked) if self._free(p)]
        if any(ranked[i].tokens_per_s > 0 for i in free):
            free = [i for i in free if ranked[i].tokens_per_s > 0]

        def cost(p: PeerCandidate) -> float:
            return (REF_TOKENS / p.tokens_per_s if p.tokens_per_s > 0 else 0.0) + p.rtt_ms / 1e3
        if len(free) < 3:
            return free
        best = min(cost(ranked[i]) for i in free)
        return [i for i in free if cost(ranked[i]) <= max(best * NEAR, best + SLACK_S)]

    def _affine(self, links: list[tuple[int, int]], remote: list[PeerCandidate],
                here_saved: int, here_wait: float | None) -> Target | None:
        """The peer holding the most of the prompt, if load is even enough to use it."""
        best, most = None, 0
        for p in remote:
            n = saved(links, p.prefixes)
            if n > most:
                best, most = p, n
        if best is None or most - here_saved < MIN_SAVED:
            return None
        waits = [self.wait(p) for p in remote] + ([here_wait] if here_wait is not None else [])
        after = best.busy + best.queued + self.unreflected(best) + 1
        if after > max(best.slots, 1) or self.wait(best) - min(waits) > BALANCE:
            return None               # it would queue, or others are much less busy
        return Target(model=best.model, peer=best, reason=f"prefix (~{most} tokens cached)")

    def capacity(self, model: str) -> int:
        """Background requests (batch lines) the mesh runs at once for `model`: on every
        node serving it, its slots less the one a worker keeps for interactive requests
        (node/backends/batching.py); 0 when nobody serves it."""
        total = 0
        local = self.local.find(model)
        if local is not None and local.state in ("loading", "loaded"):
            total += max(1, local.slots - 1)
        if self._meshed():
            total += sum(max(1, p.slots - 1) for p in self.rank(local.id if local else model))
        return total

    def model_cards(self) -> list[dict[str, Any]]:
        cards = {c["id"]: c for c in self.local.model_cards()}
        if self.peers is not None:
            for card in self.peers.model_cards():
                cards.setdefault(card["id"], card)
        return sorted(cards.values(), key=lambda c: c["id"])

    # ------------------------------------------------------------ dispatch
    async def open(self, request: Request, *, caller: dict[str, Any] | None = None,
                   proxied: bool = False, deadline: float | None = None) -> Call:
        """Serve `request` here or on the best peer; return once its first event is in.

        Raises the MeshError of the last candidate when none could start it."""
        if deadline is None:
            deadline = trio.current_time() + self.request_timeout
        if (isinstance(request, Generate) and request.max_wait is None
                and not request.background and self.queue_timeout):
            request = request.model_copy(update={"max_wait": self.queue_timeout})
        links = (chain(request) if isinstance(request, Generate) and self.affinity
                 and not proxied and self._meshed() else None)
        targets = self.plan(request.model, proxied=proxied, kind=request.kind, links=links,
                            background=isinstance(request, Generate) and request.background)
        last: MeshError | None = None
        for i, target in enumerate(targets):
            stack = contextlib.AsyncExitStack()
            try:
                events = await self._enter(stack, target, request, caller, deadline)
                first = await _next_event(events, deadline)
                if isinstance(first, Failed):
                    raise error_from_failed(first)
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await stack.aclose()
                if isinstance(exc, PeerSilent) and target.peer is not None:
                    self.silent_since[target.peer.peer_id] = trio.current_time()
                if isinstance(exc, RETRYABLE) and i + 1 < len(targets):
                    log.info("%s could not start the request (%s); trying %s", target.name,
                             exc.message, targets[i + 1].name)
                    last = exc
                    continue
                raise
            self.routes[target.reason.split(" (")[0]] += 1
            return Call(target=target, first=first, _events=events, _stack=stack,
                        deadline=deadline)
        raise last or MeshError("no candidate")   # unreachable: the loop raises or returns

    async def _enter(self, stack: contextlib.AsyncExitStack, target: Target, request: Request,
                     caller: dict[str, Any] | None, deadline: float) -> AsyncIterator[Event]:
        if target.model != request.model:
            request = request.model_copy(update={"model": target.model})
        with trio.move_on_at(deadline) as scope:
            if target.peer is None:
                return await stack.enter_async_context(self.local.open(target.model, request))
            peer = target.peer
            assert self.transport is not None
            self.in_flight_to[peer.peer_id] = self.in_flight_to.get(peer.peer_id, 0) + 1
            sent = trio.current_time()
            self.sent_at.setdefault(peer.peer_id, []).append(sent)
            stack.callback(self._release, peer.peer_id, sent)
            return await stack.enter_async_context(
                self.transport.open(peer, request, caller=caller, deadline=deadline))
        assert scope.cancelled_caught
        raise Timeout(f"{target.name} did not take the request before its deadline",
                      code="deadline_exceeded")

    def _release(self, peer_id: str, sent: float | None = None) -> None:
        self.in_flight_to[peer_id] = max(0, self.in_flight_to.get(peer_id, 1) - 1)
        times = self.sent_at.get(peer_id)
        if times is not None and sent in times:
            times.remove(sent)


def _check_backend(model: str, backend: str, need: str | None) -> None:
    if need is not None and backend != need:
        what = {"llama": "text generation and embeddings", "whisper": "audio transcription",
                "piper": "speech synthesis"}
        raise BadRequest(f"model '{model}' ({backend}) does not support this endpoint; it "
                         f"serves {what.get(backend, backend)}", param="model",
                         code="model_not_supported")
