"""API keys at the door: an ASGI middleware in front of the whole app.

Policy (docs/architecture.md, "Security"):
- No live key in the mesh: the node is open, except key management, which is then
  accepted only from loopback (the owner makes the first, admin, key on the machine).
- Otherwise every route but /health, /readyz and /openapi.json needs
  `Authorization: Bearer mk-...`: 401 when missing, unknown or revoked; 403 when the
  key lacks the route's feature. Failed attempts are counted per client address:
  more than FAILS_PER_WINDOW in FAIL_WINDOW seconds -> 429 until the window passes.
- Concurrent requests per key are capped (`max_concurrent_per_key`), streams included
  (the middleware sees the whole response, which a Quart hook would not).
- A request proxied by a mesh peer arrives with `scope.extensions["mesh.peer"]` and
  `["mesh.caller"]`, which only our proxy handler sets, and only for admitted peers:
  the origin authenticated the caller; we enforce the caller's features again.
It runs at the ASGI layer so proxied requests (served by calling the app in-process)
pass through the same door.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque

FAIL_WINDOW = 60.0
FAILS_PER_WINDOW = 10
OPEN_PATHS = {"/health", "/readyz", "/openapi.json"}
_FEATURES = (("/v1/chat/", "chat"), ("/v1/completions", "completions"),
             ("/v1/embeddings", "embeddings"), ("/v1/audio/", "audio"), ("/v1/models", "models"),
             ("/mesh/", "admin"), ("/metrics", "admin"))
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def feature_for(path: str) -> str | None:
    for prefix, feature in _FEATURES:
        if path.startswith(prefix):
            return feature
    return None


def _error(status: int, message: str, code: str, etype: str):
    body = json.dumps({"error": {"message": message, "type": etype, "param": None,
                                 "code": code}}).encode()
    return status, body


class AuthMiddleware:
    def __init__(self, app, keyring, *, max_concurrent_per_key: int = 0) -> None:
        self.app = app
        self.keyring = keyring
        self.max_concurrent = max_concurrent_per_key
        self.active: dict[str, int] = defaultdict(int)
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
        if key_id is None:
            return await self.app(scope, receive, send)
        self.active[key_id] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active[key_id] -= 1

    def _check(self, scope):
        path = scope.get("path", "/")
        ext = scope.setdefault("extensions", {})
        if ext.get("mesh.peer"):
            caller = ext.get("mesh.caller")
            if not self.keyring.enforcing:
                return None
            if not caller:
                return _error(401, "the forwarding node sent no caller identity",
                              "invalid_api_key", "authentication_error")
            return self._feature(caller.get("features") or [], path)
        if path in OPEN_PATHS:
            return None
        client = (scope.get("client") or ("", 0))[0]
        if not self.keyring.enforcing:
            ext["mesh.caller"] = None
            if path.startswith("/mesh/keys") and client not in _LOOPBACK:
                return _error(403, "while the mesh has no API key, keys can only be managed "
                                   "from the node's own machine (loopback)",
                              "loopback_only", "permission_error")
            return None
        fails = self.fails.get(client) or deque()
        now = time.monotonic()
        while fails and now - fails[0] > FAIL_WINDOW:
            fails.popleft()
        if not fails:
            self.fails.pop(client, None)
        if len(fails) >= FAILS_PER_WINDOW:
            return _error(429, "too many failed authentication attempts; try again later",
                          "rate_limit_exceeded", "rate_limit_error")
        presented = None
        for k, v in scope.get("headers") or []:
            if k == b"authorization":
                value = v.decode("latin-1")
                if value[:7].lower() == "bearer ":
                    presented = value[7:].strip()
        rec = self.keyring.verify(presented)
        if rec is None:
            fails.append(now)
            self.fails[client] = fails
            msg = ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
                   if not presented else "Incorrect or revoked API key provided.")
            return _error(401, msg, "invalid_api_key", "authentication_error")
        denied = self._feature(rec.features, path)
        if denied is not None:
            return denied
        if self.max_concurrent and self.active[rec.key_id] >= self.max_concurrent:
            return _error(429, f"key {rec.name!r} already has {self.max_concurrent} requests "
                               "in progress", "concurrency_limit", "rate_limit_error")
        ext["mesh.caller"] = {"name": rec.name, "key_id": rec.key_id,
                              "features": list(rec.features)}
        return None

    @staticmethod
    def _feature(features, path: str):
        need = feature_for(path)
        if need is None or "admin" in features or need in features:
            return None
        return _error(403, f"this API key does not have the '{need}' feature",
                      "feature_not_granted", "permission_error")
