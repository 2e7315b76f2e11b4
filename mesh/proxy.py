"""`/mesh/openai/2`: a typed request carried to a peer, its typed events carried back.

Wire (mesh/wire/framing.py frames on an admitted, Noise+PSK libp2p stream; the request
and events are mesh/wire/inference.py's vocabulary):

    origin -> peer   {"v": 2, "request": Request, "caller": {name, key_id, features} | None,
                      "deadline": seconds left}
    peer -> origin   {"event": Heartbeat}              at once: "accepted, working on it"
                     {"event": Delta | Done | Result | Failed | Heartbeat} ...

The peer validates the request (decode_request), checks the caller's features against
its own view of the key ring (``authorize``, given by the composition root), and serves
it with its own router, local only (``proxied=True``: one hop, never two). It never runs
the HTTP app: OpenAI objects and SSE are formatted once, at the node the client talks to.

Liveness. While a request runs the peer sends a Heartbeat at least every HEARTBEAT_S
(1 s), events or not (a request waiting in the worker's queue is still alive). The
origin reads with a SILENCE_S (3 s) limit; silence raises ``PeerSilent``, which the
router turns into "try the next candidate" before the first event and into a Failed
event (then `[DONE]` at the API) after it, and which takes the peer out of routing until
gossip shows it alive again. Opening (stream, request frame, the peer's first heartbeat)
on an existing connection must take less than ACK_S (1.5 s): a frozen peer's TCP
connection stays up, so only its silence gives it away, and a request for another
candidate must not wait the full SILENCE_S.

Cancellation. When the origin's client goes away the origin resets the stream; the peer
sees EOF or a reset on its read side, cancels the request (the worker stops at the next
token) and stops. The origin never half-closes before the terminal event for the same
reason: the peer takes EOF for "gone".
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from mesh.errors import BadMessage, MeshError, PeerError, PeerSilent, RateLimited
from mesh.keys import InFlight
from mesh.wire.framing import FrameError, FrameReader, pack
from mesh.wire.inference import (TERMINAL, VERSION, Event, Heartbeat, Request,
                                 decode_event, decode_request, encode_event, encode_request,
                                 failed_from_error)

log = logging.getLogger("mesh.proxy")

__all__ = ["PROTOCOL", "HEARTBEAT_S", "SILENCE_S", "ACK_S", "ProxyClient", "make_handler"]

PROTOCOL = "/mesh/openai/2"
HEARTBEAT_S = 1.0            # peer: longest quiet between two frames of a running request
SILENCE_S = 3.0              # origin: quiet after which the peer is taken for frozen
ACK_S = 1.5                  # origin: stream + request + first heartbeat, connection up
OPEN_TIMEOUT = 10.0          # origin: the same when a connection must be dialed first
REQUEST_TIMEOUT = 10.0       # peer: wait for the request frame


# ------------------------------------------------------------------ origin side
class ProxyClient:
    """The router's PeerTransport over the mesh (mesh/router.py)."""

    def __init__(self, p2p) -> None:
        self.p2p = p2p

    @contextlib.asynccontextmanager
    async def open(self, peer, request: Request, *, caller: dict[str, Any] | None,
                   deadline: float) -> AsyncIterator[AsyncIterator[Event]]:
        head = {"v": VERSION, "request": encode_request(request), "caller": caller,
                "deadline": max(0.0, deadline - trio.current_time())}
        limit = ACK_S if self.p2p.is_connected(peer.peer_id) else OPEN_TIMEOUT
        stream = None
        finished = False
        try:
            with _translated(peer):
                with trio.move_on_after(limit) as scope:
                    stream = await self.p2p.open_stream(peer.peer_id, PROTOCOL)
                    await stream.write(pack(head))
                    reader = FrameReader(stream)
                    first = await _read_event(reader, peer)
                if scope.cancelled_caught:
                    raise PeerSilent(f"peer {peer.name!r} did not take the request within "
                                     f"{limit:.1f} s")

            async def events() -> AsyncIterator[Event]:
                nonlocal finished
                pending = None if isinstance(first, Heartbeat) else first
                while True:
                    if pending is not None:
                        ev, pending = pending, None
                    else:
                        with _translated(peer):
                            with trio.move_on_after(SILENCE_S) as quiet:
                                ev = await _read_event(reader, peer)
                        if quiet.cancelled_caught:
                            raise PeerSilent(f"the serving node {peer.name!r} sent nothing for "
                                             f"{SILENCE_S:.0f} s")
                    if isinstance(ev, TERMINAL):
                        finished = True
                    yield ev
                    if finished:
                        return

            yield events()
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await (_quiet(stream.close) if finished else _quiet(stream.reset))


async def _read_event(reader: FrameReader, peer) -> Event:
    frame = await reader.read()
    if frame is None:
        raise PeerError(f"the serving node {peer.name!r} closed the stream early")
    return decode_event(frame.get("event"))


@contextlib.contextmanager
def _translated(peer):
    """Lower-level failures of one peer stream as the tree's PeerError."""
    try:
        yield
    except MeshError:
        raise
    except (FrameError, ValueError) as exc:
        raise BadMessage(f"the serving node {peer.name!r} sent a bad frame: {exc}") from exc
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise PeerError(f"the serving node {peer.name!r} failed: {exc}") from exc


async def _quiet(close: Callable[[], Awaitable[None]]) -> None:
    with contextlib.suppress(MeshError, OSError, trio.BrokenResourceError,
                             trio.ClosedResourceError):
        await close()


# -------------------------------------------------------------------- peer side
Authorize = Callable[[dict[str, Any] | None, Request], None]


def make_handler(router, *, authorize: Authorize, max_deadline: float,
                 in_flight: InFlight | None = None):
    """The `/mesh/openai/2` handler: serve a peer's typed request with our own router.
    `in_flight` is the node's per-key cap (the same one its HTTP API counts against)."""
    in_flight = in_flight or InFlight()

    async def handle(stream, peer_id: str) -> None:
        reader = FrameReader(stream)
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                head = await reader.read()
            except (FrameError, MeshError) as exc:
                log.info("bad proxy request from %s: %s", peer_id[-8:], exc)
                head = None
        if not head or head.get("v") != VERSION:
            log.info("proxy request from %s of version %r refused", peer_id[-8:],
                     (head or {}).get("v"))
            await _quiet(stream.reset)
            return
        caller = head.get("caller")
        key_id = caller.get("key_id") if isinstance(caller, dict) else None
        if in_flight.full(key_id):
            await _refuse(stream, RateLimited(
                f"this API key already has {in_flight.cap} requests in progress on the "
                "serving node", code="concurrency_limit"))
            return
        with in_flight.hold(key_id):
            await _serve(stream, router, authorize, head, max_deadline)

    return handle


async def _refuse(stream, exc: MeshError) -> None:
    with contextlib.suppress(MeshError, OSError):
        await stream.write(pack({"event": encode_event(failed_from_error(exc))}))
        await stream.close()


async def _serve(stream, router, authorize: Authorize, head: dict[str, Any],
                 max_deadline: float) -> None:
    lock = trio.Lock()

    async def send(ev: Event) -> None:
        async with lock:
            await stream.write(pack({"event": encode_event(ev)}))

    try:
        request = decode_request(head.get("request"))
        caller = head.get("caller")
        authorize(caller if isinstance(caller, dict) else None, request)
        left = float(head.get("deadline") or max_deadline)
    except MeshError as exc:
        await send(failed_from_error(exc))
        return
    deadline = trio.current_time() + min(max(left, 0.0), max_deadline)

    async def heartbeats() -> None:
        while True:
            await send(Heartbeat())
            await trio.sleep(HEARTBEAT_S)

    async def watch_origin(scope: trio.CancelScope) -> None:
        # The origin sends nothing after its request: EOF or a reset means it is gone.
        with contextlib.suppress(MeshError, OSError):
            await stream.read(1)
        scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeats)
            nursery.start_soon(watch_origin, nursery.cancel_scope)
            try:
                call = await router.open(request, caller=caller, proxied=True,
                                         deadline=deadline)
            except MeshError as exc:
                await send(failed_from_error(exc))
            else:
                try:
                    async for ev in call.events():
                        await send(ev)
                finally:
                    await call.aclose()
            nursery.cancel_scope.cancel()
    except (MeshError, OSError) as exc:
        log.info("proxy stream ended early: %s", exc)
        await _quiet(stream.reset)

