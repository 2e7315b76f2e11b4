"""ASGI middleware: read whatever request body the app left unread, before responding.

Hypercorn (h11) serves the next request of a keep-alive connection only once the
previous request's body has been read, and a body that arrives after the response went
out is never read: the client's next request on that connection hangs forever (found
by schemathesis with 405s, Quart's automatic OPTIONS and auth refusals). So when the app
starts its response while body is still unread, this reads the rest first, up to
`limit` bytes and DRAIN_TIMEOUT seconds; past either, the response says
`connection: close` and Hypercorn drops the connection after it.
"""

from __future__ import annotations

import trio

DRAIN_TIMEOUT = 10.0


class DrainUnreadBody:
    def __init__(self, app, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        complete = trio.Event()
        reading = 0          # receive() calls in progress (Quart keeps one open meanwhile)

        async def tracked():
            nonlocal reading
            reading += 1
            try:
                msg = await receive()
            finally:
                reading -= 1
            if msg["type"] != "http.request" or not msg.get("more_body"):
                complete.set()
            return msg

        async def draining_send(message):
            if message["type"] == "http.response.start" and not complete.is_set():
                seen = 0
                with trio.move_on_after(DRAIN_TIMEOUT):
                    while not complete.is_set() and seen <= self.limit:
                        if reading:                  # the app's own reader will get it
                            await complete.wait()
                        else:
                            seen += len((await tracked()).get("body") or b"")
                if not complete.is_set():
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracked, draining_send)
