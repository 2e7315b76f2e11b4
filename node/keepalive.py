"""Ollama's `keep_alive` for the models this node serves itself: load on demand, unload idle.

Ollama loads a model when a request names it and keeps it loaded for that request's
`keep_alive` once the request is over (default 5 minutes; 0: unload right after; a
negative value: forever); each request sets the model's timer again, the last one to end
wins. This service does the same for this node's worker pool, reached by the API through
the Services façade (`svc.keepalive`, used by api/ollama_routes.py):

- `prepare(name, backend)`: the local model `name` names, loaded; a model installed here
  but not loaded is loaded now (the request's `load_duration`). None when this node has
  no such model: the router may still find it on a peer, whose own configuration says
  how long it stays loaded (the API refuses a keep_alive for it rather than pretend).
- `hold(model_id, keep)`: around one request. While any request holds a model its timer
  is off; when the last one ends the timer is set to that request's `keep` (seconds,
  math.inf: forever, None: the model's default). `keep == 0` unloads at once, before the
  request's answer is sent, unless other requests (another dialect's) still run on it.
- A model's default (a request without keep_alive): forever for models loaded on purpose
  (`mesh up --model`, /mesh/models/load, an install with load: `pin`), so they behave as
  before; DEFAULT_KEEP_ALIVE for the models this service loaded on demand.
- `serve()` (in the daemon's nursery) sleeps until the earliest deadline or a change and
  unloads what expired. A model still busy at its deadline with requests that carry no
  keep_alive (OpenAI, Anthropic dialects) is looked at again every BUSY_RECHECK seconds
  and unloaded once idle: no request is cut off by a timer.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import psutil
import trio

from gallery.store import Store
from mesh.errors import BadRequest, NotFound
from node.services import spec_for
from node.workers import WorkerPool

log = logging.getLogger("node.keepalive")

DEFAULT_KEEP_ALIVE = 300.0      # seconds: Ollama's 5m
BUSY_RECHECK = 1.0              # seconds between looks at an expired model still in use


@dataclass
class _Timer:
    keep: float = math.inf      # seconds after the last request ends
    deadline: float | None = None   # trio clock; None while held or kept forever
    holds: int = 0


class KeepAlive:
    def __init__(self, pool: WorkerPool, store: Store, *,
                 unload: Callable[[str], Awaitable[None]],
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.pool = pool
        self.store = store
        self._unload = unload
        self.on_change = on_change
        self.timers: dict[str, _Timer] = {}
        self.on_demand: set[str] = set()        # loaded by prepare(): default DEFAULT_KEEP_ALIVE
        self._changed = trio.Event()

    # ------------------------------------------------------------ requests
    def loaded(self, name: str) -> str | None:
        """The id of the model `name` names if it is loaded (or loading) here."""
        w = self.pool.find(name)
        return w.id if w is not None and w.state in ("loading", "loaded") else None

    async def prepare(self, name: str, backend: str) -> str | None:
        """The id of the local model `name` names, loaded now if it is only installed here;
        None when this node neither runs nor has it. A model of another backend is a 400."""
        mid = self.loaded(name)
        if mid is not None:
            return mid
        installed = self.store.get(name)
        if installed is None:
            return None
        if installed.backend != backend:
            what = {"llama": "text generation and embeddings", "whisper": "audio transcription"}
            raise BadRequest(f"model '{installed.id}' ({installed.backend}) does not support this "
                             f"endpoint; it serves {what.get(installed.backend, installed.backend)}",
                             param="model", code="model_not_supported")
        log.info("loading %s on demand", installed.id)
        w = await self.pool.load(spec_for(installed), wait=True)
        self.on_demand.add(w.id)
        t = self.timers.setdefault(w.id, _Timer(keep=DEFAULT_KEEP_ALIVE))
        if not t.holds:          # armed now, so a request that fails before its hold
            t.deadline = trio.current_time() + t.keep      # cannot leave it loaded for good
            self._wake()
        self.on_change()
        return w.id

    def default(self, model_id: str) -> float:
        return DEFAULT_KEEP_ALIVE if model_id in self.on_demand else math.inf

    @asynccontextmanager
    async def hold(self, model_id: str, keep: float | None) -> AsyncIterator[None]:
        t = self.timers.setdefault(model_id, _Timer(keep=self.default(model_id)))
        t.holds += 1
        t.deadline = None
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await self._release(model_id, t, keep)

    async def _release(self, model_id: str, t: _Timer, keep: float | None) -> None:
        t.holds -= 1
        t.keep = self.default(model_id) if keep is None else keep
        if t.holds:
            return
        w = self.pool.get(model_id)
        if t.keep <= 0 and w is not None and not w.in_flight:
            await self.unload(model_id)
            return
        t.deadline = None if math.isinf(t.keep) else trio.current_time() + t.keep
        self._wake()

    async def unload(self, model_id: str) -> None:
        """Unload now (keep_alive 0, /api/delete); a model already gone is no error."""
        self.timers.pop(model_id, None)
        self.on_demand.discard(model_id)
        self._wake()
        try:
            await self._unload(model_id)
            log.info("unloaded %s (keep_alive)", model_id)
        except NotFound:
            pass

    def pin(self, model_id: str) -> None:
        """Loaded on purpose: no idle timer, whatever an earlier request asked."""
        self.on_demand.discard(model_id)
        self.timers.pop(model_id, None)
        self._wake()

    # ---------------------------------------------------------------- view
    def expires_at(self, model_id: str) -> float | None:
        """When the model will be unloaded (wall clock), None for never."""
        t = self.timers.get(model_id)
        keep = t.keep if t is not None else self.default(model_id)
        if t is not None and t.deadline is not None:
            return time.time() + max(0.0, t.deadline - trio.current_time())
        return None if math.isinf(keep) else time.time() + keep

    def running(self) -> list[dict[str, Any]]:
        """The models loaded here, for /api/ps: id, backend, ctx, resident bytes, expiry."""
        out = []
        for w in list(self.pool.workers.values()):
            if w.state not in ("loading", "loaded"):
                continue
            try:
                rss = psutil.Process(w.pid).memory_info().rss if w.pid else 0
            except psutil.Error:
                rss = 0
            out.append({"id": w.id, "backend": w.backend, "ctx": w.info.get("ctx"),
                        "state": w.state, "resident_bytes": rss,
                        "expires_at": self.expires_at(w.id), "gpu_layers":
                        w.spec.config.get("gpu_layers")})
        return out

    # --------------------------------------------------------------- timer
    def _wake(self) -> None:
        old, self._changed = self._changed, trio.Event()
        old.set()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        while True:
            changed = self._changed
            now = trio.current_time()
            for mid, t in list(self.timers.items()):
                if t.deadline is not None and t.deadline <= now:
                    await self._expire(mid, t)
            due = min((t.deadline for t in self.timers.values() if t.deadline is not None),
                      default=math.inf)
            with trio.move_on_at(due):
                await changed.wait()

    async def _expire(self, model_id: str, t: _Timer) -> None:
        w = self.pool.get(model_id)
        if w is None:                        # unloaded some other way
            self.timers.pop(model_id, None)
            self.on_demand.discard(model_id)
        elif w.in_flight:
            t.deadline = trio.current_time() + BUSY_RECHECK
        else:
            log.info("%s idle for its keep_alive (%.0f s)", model_id, t.keep)
            await self.unload(model_id)
