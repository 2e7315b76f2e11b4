"""`/mesh/openai/2`: a typed request carried to a peer, its typed events carried back.

Wire (mesh/wire/framing.py frames on an admitted, Noise+PSK libp2p stream; the request
and events are mesh/wire/inference.py's vocabulary):

    origin -> peer   {"v": 2, "request": Request, "caller": {name, key_id, features} | None,
                      "deadline": seconds left, "bulk": <client hello> | absent}
    peer -> origin   {"event": Heartbeat, "bulk": <offer> | absent}
                                                       at once: "accepted, working on it"
    origin -> peer   {"via": "bulk" | "stream"}        only when the peer offered a channel
    peer -> origin   {"event": Delta | Done | Result | Failed | Heartbeat} ...
                     on the side channel when chosen, else on the stream

Side channel. A py-libp2p frame costs ~0.5-1 ms of Python on each side (yamux, Noise,
locks, task switches), once per event of a stream: measured here (bench/mesh.py) that
was most of what a proxy hop cost per token. So, as peer file transfers and the RPC
tunnel do (mesh/bulk.py), the peer offers a side channel in its first frame: the origin
connects to it (a ticket, keys derived on this admitted stream, AES-GCM records) and
says which path it took; events then go as the same frames, one record each, on the
channel, and the stream only carries the origin's EOF or reset (cancellation, below).
Where the channel cannot be reached (the peer's bulk port is off, `bulk_port: -1`, or
filtered) the origin says "stream" and everything stays on the stream. The peer starts
serving as soon as the request is valid; events wait for the origin's choice, so the
channel's connect overlaps the prompt's prefill.

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

Cancellation. When the origin's client goes away the origin resets the stream (and
closes the channel); the peer sees EOF or a reset on the stream's read side, cancels the
request (the worker stops at the next token) and stops. The origin never half-closes
before the terminal event for the same reason: the peer takes EOF for "gone".
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from mesh import bulk
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
VIA_TIMEOUT = 10.0           # peer: wait for the origin's choice of path (bulk.connect's
                             # CONNECT_TIMEOUT per address it tries, at most)
PURPOSE = "proxy"            # mesh/bulk.py key derivation


# ------------------------------------------------------------------ origin side
class ProxyClient:
    """The router's PeerTransport over the mesh (mesh/router.py)."""

    def __init__(self, p2p, *, side_channel: bool = True) -> None:
        self.p2p = p2p
        self.side_channel = side_channel     # False: events stay on the stream (benchmarks)

    @contextlib.asynccontextmanager
    async def open(self, peer, request: Request, *, caller: dict[str, Any] | None,
                   deadline: float) -> AsyncIterator[AsyncIterator[Event]]:
        nonce, hello = bulk.client_hello() if self.side_channel else (b"", None)
        head = {"v": VERSION, "request": encode_request(request), "caller": caller,
                "deadline": max(0.0, deadline - trio.current_time()),
                **({"bulk": hello} if hello else {})}
        limit = ACK_S if self.p2p.is_connected(peer.peer_id) else OPEN_TIMEOUT
        stream = chan = None
        finished = False
        try:
            with _translated(peer):
                with trio.move_on_after(limit) as scope:
                    stream = await self.p2p.open_stream(peer.peer_id, PROTOCOL)
                    await stream.write(pack(head))
                    reader = FrameReader(stream)
                    frame = await _read_frame(reader, peer)
                    first = decode_event(frame.get("event"))
                if scope.cancelled_caught:
                    raise PeerSilent(f"peer {peer.name!r} did not take the request within "
                                     f"{limit:.1f} s")
                if hello and frame.get("bulk") is not None:
                    chan = await self._channel(peer, frame["bulk"], nonce)
                    await stream.write(pack({"via": "bulk" if chan else "stream"}))
                    if chan is not None:
                        reader = FrameReader(chan)
            log.debug("proxy to %s: events on %s", peer.name,
                      "the side channel" if chan else "the libp2p stream")

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
            with trio.CancelScope(shield=True):
                if chan is not None:
                    await chan.close()
                if stream is not None:
                    await (_quiet(stream.close) if finished else _quiet(stream.reset))

    async def _channel(self, peer, offer: Any, nonce: bytes) -> "_Channel | None":
        """The side channel the peer offered, or None (the events stay on the stream)."""
        known = self.p2p.view.get(peer.peer_id)
        try:
            conn, keys = await bulk.connect(bulk.ips_of(known.state.addrs if known else []),
                                            offer, nonce, PURPOSE, self.p2p.peer_id,
                                            peer.peer_id)
        except bulk.ChannelBroken as exc:
            log.info("proxy to %s: %s; using the libp2p stream", peer.name, exc.message)
            return None
        return _Channel(bulk.TrioChannel(conn, keys))


class _Channel:
    """A side channel (mesh/bulk.py) as a stream of frames: `write` sends its bytes as one
    record, `read` returns the next record's (b"" at EOF), so FrameReader and `pack` serve
    both paths alike."""

    def __init__(self, chan: bulk.TrioChannel) -> None:
        self.chan = chan

    async def write(self, data: bytes) -> None:
        await self.chan.send(data)

    async def read(self, n: int = -1) -> bytes:
        return await self.chan.recv()

    async def close(self) -> None:
        await self.chan.aclose()


async def _read_frame(reader: FrameReader, peer) -> dict[str, Any]:
    frame = await reader.read()
    if frame is None:
        raise PeerError(f"the serving node {peer.name!r} closed the stream early")
    return frame


async def _read_event(reader: FrameReader, peer) -> Event:
    return decode_event((await _read_frame(reader, peer)).get("event"))


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
                 in_flight: InFlight | None = None, bulk_server: bulk.BulkServer | None = None):
    """The `/mesh/openai/2` handler: serve a peer's typed request with our own router.
    `in_flight` is the node's per-key cap (the same one its HTTP API counts against);
    `bulk_server`, when given, carries the events of an origin that asks for it."""
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
            await _serve(stream, router, authorize, head, max_deadline, peer_id, bulk_server)

    return handle


async def _refuse(stream, exc: MeshError) -> None:
    with contextlib.suppress(MeshError, OSError):
        await stream.write(pack({"event": encode_event(failed_from_error(exc))}))
        await stream.close()


async def _serve(stream, router, authorize: Authorize, head: dict[str, Any],
                 max_deadline: float, peer_id: str = "",
                 bulk_server: bulk.BulkServer | None = None) -> None:
    lock = trio.Lock()
    out: Any = stream                # where events go: the stream, or the side channel
    chosen = trio.Event()            # the origin chose (or there was no choice to make)

    async def send(ev: Event) -> None:
        await chosen.wait()
        async with lock:
            await out.write(pack({"event": encode_event(ev)}))

    try:
        request = decode_request(head.get("request"))
        caller = head.get("caller")
        authorize(caller if isinstance(caller, dict) else None, request)
        left = float(head.get("deadline") or max_deadline)
    except MeshError as exc:
        chosen.set()
        await send(failed_from_error(exc))
        return
    deadline = trio.current_time() + min(max(left, 0.0), max_deadline)
    offer = (bulk_server.offer(peer_id, PURPOSE, head["bulk"])
             if bulk_server is not None and head.get("bulk") is not None else None)

    async def heartbeats() -> None:
        while True:
            await trio.sleep(HEARTBEAT_S)
            await send(Heartbeat())

    async def watch_origin(scope: trio.CancelScope) -> None:
        # The origin sends nothing after its request (and its "via"): EOF or a reset
        # means it is gone.
        nonlocal out
        with contextlib.suppress(MeshError, OSError, FrameError, ValueError):
            if offer is not None:
                reader, via = FrameReader(stream), None
                with trio.move_on_after(VIA_TIMEOUT):
                    via = await reader.read()
                if isinstance(via, dict) and via.get("via") == "bulk":
                    sock = await offer.accept(bulk_server)
                    if sock is None:
                        raise PeerError("the origin chose the side channel but never came")
                    out = _Channel(bulk.TrioChannel(bulk.to_trio(sock), offer.keys))
                elif isinstance(via, dict) and via.get("via") == "stream":
                    offer.withdraw(bulk_server)
                else:
                    raise PeerError("the origin did not say which path to use")
                chosen.set()
            await stream.read(1)
        scope.cancel()

    try:
        await stream.write(pack({"event": encode_event(Heartbeat()),    # "accepted", at once
                                 **({"bulk": offer.wire} if offer else {})}))
        if offer is None:
            chosen.set()
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
    finally:
        if out is not stream:
            await out.close()
        elif offer is not None and not chosen.is_set():
            offer.withdraw(bulk_server)

