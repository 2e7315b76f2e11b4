"""API keys at the door: an ASGI middleware in front of the whole app.

Policy (docs/architecture.md, "Security"):
- No live key in the mesh: the node is open, except key management, which is then
  accepted only from loopback (the owner makes the first, admin, key on the machine).
- Otherwise every route but /health, /readyz, /openapi.json and the dashboard's page and
  static files (`/`, `/ui/...`: no data in them; every call they make is checked) needs
  `Authorization: Bearer mk-...` (or `x-api-key: mk-...`, as the Anthropic SDK sends
  it): 401 when missing, unknown or revoked; 403 when the key lacks the route's feature
  (the error body in the route's dialect, api/errors.py). Failed attempts are counted
  per client address: more than FAILS_PER_WINDOW in FAIL_WINDOW seconds -> 429 until the
  window passes.
- While the mesh has no key, every response carries `x-mesh-open` saying so.
- Concurrent requests per key are capped (`max_concurrent_per_key`), streams included
  (the middleware sees the whole response, which a Quart hook would not).
- The caller's identity and features go into `scope.extensions["mesh.caller"]`; the
  routes hand them to the router, and a request proxied to a peer carries them in its
  typed frame (mesh/proxy.py), where the peer checks the features again: secrets never
  cross the mesh. It runs at the ASGI layer so it sees whole responses, streams included.
"""

from __future__ import annotations

import time
from collections import deque

from api.errors import asgi_error
from mesh.keys import InFlight
from mesh.errors import AuthError, MeshError, PermissionDenied, RateLimited

FAIL_WINDOW = 60.0
FAILS_PER_WINDOW = 10
OPEN_PATHS = {"/health", "/readyz", "/openapi.json", "/"}   # "/": the dashboard page, no data
OPEN_PREFIXES = ("/ui/",)     # the dashboard's static files (api/dashboard_routes.py)
# The feature each route needs (longest prefix first where they overlap). The dialects map
# onto the same features: a key that may chat may chat in any dialect.
_FEATURES = (("/v1/chat/", "chat"), ("/v1/responses", "chat"), ("/v1/messages", "chat"),
             ("/api/chat", "chat"), ("/v1/completions", "completions"),
             ("/api/generate", "completions"), ("/tokenize", "completions"),
             ("/detokenize", "completions"), ("/v1/embeddings", "embeddings"),
             ("/api/embed", "embeddings"), ("/v1/audio/", "audio"), ("/v1/models", "models"),
             ("/v1/files", "batch"), ("/v1/batches", "batch"),
             ("/v1/agents", "agents"),
             ("/api/tags", "models"), ("/api/ps", "models"), ("/api/show", "models"),
             ("/api/version", "models"), ("/api/", "admin"),   # pull, delete, copy, create
             ("/mesh/", "admin"), ("/metrics", "admin"))
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def feature_for(path: str) -> str | None:
    for prefix, feature in _FEATURES:
        if path.startswith(prefix):
            return feature
    return None


def _error(cls: type[MeshError], message: str, code: str, path: str = "/"):
    return asgi_error(cls(message, code=code), path)


OPEN_HEADER = (b"x-mesh-open",
               b"no API key: anyone who can reach this mesh may use it (mesh keys create)")


def _warn_open(send):
    """Every response of an open mesh says so (`x-mesh-open`)."""
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), OPEN_HEADER]}
        await send(message)
    return wrapped


class AuthMiddleware:
    def __init__(self, app, keyring, *, in_flight: InFlight | None = None) -> None:
        self.app = app
        self.keyring = keyring
        self.in_flight = in_flight or InFlight()
        self.fails: dict[str, deque] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        denied = self._check(scope)
        if denied is not None:
            status, body = denied
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode())]

            if status == 401:
                headers.append((b"www-authenticate", b'Bearer realm="inference-mesh"'))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        caller = (scope.get("extensions") or {}).get("mesh.caller")
        key_id = caller.get("key_id") if caller else None
        if not self.keyring.enforcing:
            send = _warn_open(send)
        if key_id is None:
            return await self.app(scope, receive, send)
        with self.in_flight.hold(key_id):
            await self.app(scope, receive, send)

    def _check(self, scope):
        path = scope.get("path", "/")
        ext = scope.setdefault("extensions", {})
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return None
        client = (scope.get("client") or ("", 0))[0]
        if not self.keyring.enforcing:
            ext["mesh.caller"] = None
            if path.startswith("/mesh/keys") and client not in _LOOPBACK:
                return _error(PermissionDenied, "while the mesh has no API key, keys can only be managed "
                                   "from the node's own machine (loopback)",
                              "loopback_only", path)
            return None
        fails = self.fails.get(client) or deque()
        now = time.monotonic()
        while fails and now - fails[0] > FAIL_WINDOW:
            fails.popleft()
        if not fails:
            self.fails.pop(client, None)
        if len(fails) >= FAILS_PER_WINDOW:
            return _error(RateLimited, "too many failed authentication attempts; try again later",
                          "rate_limit_exceeded", path)
        presented = None
        for k, v in scope.get("headers") or []:
            if k == b"authorization":
                value = v.decode("latin-1")
                if value[:7].lower() == "bearer ":
                    presented = value[7:].strip()
            elif k == b"x-api-key" and presented is None:   # the Anthropic SDK's header
                presented = v.decode("latin-1").strip()
        rec = self.keyring.verify(presented)
        if rec is None:
            fails.append(now)
            self.fails[client] = fails
            msg = ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
                   if not presented else "Incorrect or revoked API key provided.")
            return _error(AuthError, msg, "invalid_api_key", path)
        denied = self._feature(rec.features, path)
        if denied is not None:
            return denied
        if self.in_flight.full(rec.key_id):
            return _error(RateLimited, f"key {rec.name!r} already has {self.in_flight.cap} "
                          "requests in progress", "concurrency_limit", path)
        ext["mesh.caller"] = {"name": rec.name, "key_id": rec.key_id,
                              "features": list(rec.features)}
        return None

    @staticmethod
    def _feature(features, path: str):
        need = feature_for(path)
        if need is None or "admin" in features or need in features:
            return None
        return _error(PermissionDenied, f"this API key does not have the '{need}' feature",
                      "feature_not_granted", path)
