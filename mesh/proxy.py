"""`/mesh/openai/1`: one HTTP request carried to a peer over a libp2p stream.

Wire (length-prefixed msgpack frames, node/frames.py, on an admitted, Noise+PSK stream):

    origin -> peer   {"v": 1, "method", "path", "query", "headers": [[k, v]...],
                      "body": bytes, "deadline": seconds left, "caller": {...} | None}
    peer -> origin   {"t": "start", "status", "headers": [[k, v]...]}
                     {"t": "body", "data": bytes}  (0..n; SSE chunks as they come)
                     {"t": "end"} | {"t": "error", "message", "status"}

The peer serves the request by calling its own ASGI app in-process with
`scope["extensions"]["mesh.peer"] = <origin peer id>`, which tells the router never to
proxy it again (one hop). Body chunks are relayed as the app sends them: streaming stays
streaming. When the origin's client goes away, the origin resets the stream; the peer's
reader sees it and the ASGI app gets `http.disconnect`, which cancels generation in the
worker. A peer that fails before the `start` frame (dial, admission, EOF, or a 503 from
a saturated/dying worker) is skipped for the next candidate; after `start`, a failure
ends a stream with an OpenAI-shaped error event and `[DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator

import trio
from quart import Response

from mesh.errors import MeshError, PeerError, Timeout, Unavailable
from node.frames import FrameError, pack, read_frame

log = logging.getLogger("mesh.proxy")

PROTOCOL = "/mesh/openai/1"
OPEN_TIMEOUT = 10.0          # dial + admission + request frame
# Not relayed: hop-by-hop headers, and the caller's key (the peer gets the caller's
# identity and features in the request frame instead; secrets never cross the mesh).
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "upgrade", "te", "trailer", "proxy-authorization", "proxy-authenticate",
               "authorization"}
RETRY_STATUSES = {502, 503}  # a peer that says "cannot now" before any byte: try the next


class _Receiver:
    """trio-stream-like `receive_some` on a mesh Stream, for node.frames.read_frame."""

    def __init__(self, stream) -> None:
        self.stream = stream

    async def receive_some(self, n: int) -> bytes:
        return await self.stream.read(n)


async def _send(stream, obj: dict[str, Any]) -> None:
    await stream.write(pack(obj))


def _headers_out(headers) -> list[list[str]]:
    return [[k, v] for k, v in headers.items() if k.lower() not in _HOP_BY_HOP]


# ------------------------------------------------------------------ origin side
class Proxy:
    """Forwards requests the router sends to peers."""

    def __init__(self, p2p, router, *, request_timeout: float) -> None:
        self.p2p = p2p
        self.router = router
        self.request_timeout = request_timeout

    async def forward(self, route, request) -> Response:
        body = await request.get_data()
        caller = (request.scope.get("extensions") or {}).get("mesh.caller")
        head = {"v": 1, "method": request.method, "path": request.path,
                "query": request.query_string.decode("latin-1"),
                "headers": _headers_out(request.headers), "body": body,
                "deadline": self.request_timeout, "caller": caller}
        last: MeshError | None = None
        for cand in route.peers:
            try:
                stream, start = await self._open(cand.peer_id, head)
            except MeshError as exc:
                log.info("peer %s failed before the first byte: %s", cand.name, exc.message)
                last = exc
                continue
            if start["status"] in RETRY_STATUSES and cand is not route.peers[-1]:
                log.info("peer %s answered %s; trying the next", cand.name, start["status"])
                with trio.CancelScope(shield=True):
                    await stream.reset()
                continue
            return self._relay(cand, stream, start)
        raise last or Unavailable(f"no peer could serve {route.model!r}")

    async def _open(self, peer_id: str, head: dict[str, Any]):
        stream = None
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                stream = await self.p2p.open_stream(peer_id, PROTOCOL)
                await _send(stream, head)
            with trio.fail_after(self.request_timeout):
                start = await read_frame(_Receiver(stream))
            if not start or start.get("t") != "start":
                raise PeerError(f"peer {peer_id[-8:]} sent no response")
            return stream, start
        except BaseException as exc:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await _quiet_reset(stream)
            if isinstance(exc, trio.TooSlowError):
                raise Timeout(f"peer {peer_id[-8:]} did not answer in time") from None
            if isinstance(exc, (FrameError, OSError, Exception)) and not isinstance(exc, MeshError):
                raise PeerError(f"peer {peer_id[-8:]}: {type(exc).__name__}: {exc}") from exc
            raise

    def _relay(self, cand, stream, start: dict[str, Any]) -> Response:
        headers = {k: v for k, v in start.get("headers") or [] if k.lower() not in _HOP_BY_HOP}
        streaming = headers.get("content-type", "").startswith("text/event-stream")
        inflight = self.router.in_flight_to

        async def body() -> AsyncIterator[bytes]:
            inflight[cand.peer_id] = inflight.get(cand.peer_id, 0) + 1
            done = False
            try:
                while True:
                    frame = await read_frame(_Receiver(stream))
                    if frame is None:
                        raise PeerError("the peer closed the stream early")
                    if frame.get("t") == "body":
                        yield frame["data"]
                    elif frame.get("t") == "end":
                        done = True
                        return
                    else:
                        raise PeerError(frame.get("message") or "the peer failed")
            except (MeshError, FrameError, OSError, Exception) as exc:
                if isinstance(exc, trio.Cancelled):
                    raise
                msg = exc.message if isinstance(exc, MeshError) else f"peer failed: {exc}"
                log.warning("relay from %s broke: %s", cand.name, msg)
                if streaming:
                    err = PeerError(f"the serving node {cand.name!r} failed: {msg}")
                    yield b"data: " + json.dumps(err.to_openai()).encode() + b"\n\n"
                    yield b"data: [DONE]\n\n"
            finally:
                inflight[cand.peer_id] = max(0, inflight.get(cand.peer_id, 1) - 1)
                with trio.CancelScope(shield=True):
                    if done:
                        await _quiet_close(stream)
                    else:
                        await _quiet_reset(stream)

        resp = Response(body(), status=start["status"], headers=headers)
        resp.timeout = None
        return resp


async def _quiet_reset(stream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass


async def _quiet_close(stream) -> None:
    try:
        await stream.close()
    except Exception:
        pass


# -------------------------------------------------------------------- peer side
def make_handler(app, *, max_body: int):
    """The `/mesh/openai/1` handler: serve a peer's request with our own ASGI app."""

    async def handle(stream, peer_id: str) -> None:
        try:
            head = await read_frame(_Receiver(stream))
        except (FrameError, OSError, Exception) as exc:
            log.info("bad proxy request from %s: %s", peer_id[-8:], exc)
            await _quiet_reset(stream)
            return
        if not head or head.get("v") != 1 or len(head.get("body") or b"") > max_body:
            await _quiet_reset(stream)
            return
        await serve_asgi(app, stream, peer_id, head)

    return handle


async def serve_asgi(app, stream, peer_id: str, head: dict[str, Any]) -> None:
    disconnected = trio.Event()
    sent_body = False
    started = False

    async def watch_origin() -> None:
        # Anything after the request frame (or EOF / reset) means the origin gave up.
        try:
            await stream.read(1)
        except Exception:
            pass
        disconnected.set()

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": head.get("body") or b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
            hdrs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in message.get("headers", [])]
            await _send(stream, {"t": "start", "status": message["status"], "headers": hdrs})
        elif message["type"] == "http.response.body":
            data = message.get("body") or b""
            if data:
                await _send(stream, {"t": "body", "data": data})

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": head.get("method", "GET"), "scheme": "http", "path": head.get("path", "/"),
        "raw_path": head.get("path", "/").encode(), "root_path": "",
        "query_string": (head.get("query") or "").encode("latin-1"),
        "headers": [(str(k).lower().encode("latin-1"), str(v).encode("latin-1"))
                    for k, v in head.get("headers") or []],
        "client": (f"mesh:{peer_id}", 0), "server": ("mesh", 0),
        "extensions": {"mesh.peer": peer_id, "mesh.caller": head.get("caller")},
    }
    deadline = float(head.get("deadline") or 600)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_origin)
            with trio.move_on_after(deadline):
                await app(scope, receive, send)
            if started:
                await _send(stream, {"t": "end"})
            else:
                await _send(stream, {"t": "error", "status": 504, "message": "deadline passed"})
            nursery.cancel_scope.cancel()
        await _quiet_close(stream)
    except Exception as exc:
        log.info("proxy stream from %s ended: %s", peer_id[-8:], exc)
        with trio.CancelScope(shield=True):
            await _quiet_reset(stream)
