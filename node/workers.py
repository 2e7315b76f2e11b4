"""Parent side of the worker processes: spawn, speak frames, supervise, restart.

One worker process per loaded model (node/worker_main.py is the child). The parent listens
on a Unix socket under `<home>/run/` created 0600, starts the child with the socket's path,
and accepts its single connection. Requests and events are mesh/wire/inference.py's typed
vocabulary (frames: node/worker_main.py's note). A reader task routes every event to the
request that owns its id (one unbounded memory channel per request, so a slow client
never stalls the reader or other requests).

When the child dies (crash, OOM, `kill -9`) the socket reaches EOF: every in-flight request
ends with a Failed(WorkerDied) event and the child is started again after a short back-off
(node/processes.py).
A request that arrives while the worker (re)starts waits for it to be ready, up to
LOAD_TIMEOUT. Leaving a request early (client disconnect, cancellation) sends `cancel`
to the child in a shielded `finally`, so generation stops at the next token.

The pool owns the supervisors' nursery inside `serve()`; load/unload are commands sent to
it over a channel, so no nursery is stored on an object.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import trio

from mesh.errors import BadMessage, BadRequest, MeshError, NoCapacity, NotFound, Unavailable, WorkerDied
from mesh.wire.framing import FrameError, FrameReader, pack
from mesh.wire.inference import (TERMINAL, Event, Failed, Request, capabilities_of,
                                 decode_event, encode_request, merged)
from node.processes import Backoff, terminate_process

log = logging.getLogger("node.workers")

ACCEPT_TIMEOUT = 30.0      # child start-up until it connects (imports only)
LOAD_TIMEOUT = 600.0       # connect until `ready` (model load; big files on slow disks)
STATS_EVERY = 1.0          # the gossip tick: stats are as fresh as what peers see
STATS_ID = -1              # reserved request id of the stats poll's replies


@dataclass
class ModelSpec:
    """What a worker needs to load a model."""
    id: str
    backend: str
    path: str
    config: dict[str, Any] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)


class Worker:
    """Handle on one model's worker process, valid across restarts."""

    def __init__(self, spec: ModelSpec, run_dir: Path, *, max_queue: int,
                 on_change: Callable[[], None]) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.max_queue = max_queue
        self.on_change = on_change
        self.state = "loading"         # loading | loaded | failed | stopped
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.pid: int | None = None
        self.restarts = 0
        self.started_at = time.time()
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.Lock()
        self._pending: dict[int, trio.MemorySendChannel] = {}
        self._background: set[int] = set()      # ids of the pending batch lines
        self._ids = itertools.count(1)
        self._ready = trio.Event()
        self._cancel_scope: trio.CancelScope | None = None
        self.stats: dict[str, Any] = {}

    # ----------------------------------------------------------- properties
    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def background(self) -> int:
        """Batch lines (Generate.background) among the requests in flight."""
        return len(self._background)

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def slots(self) -> int:
        return int(self.stats.get("slots") or self.info.get("slots") or 1)

    @property
    def capabilities(self) -> list[str]:
        """What it serves, from its backend and the child's ready info (the backend's
        defaults until that arrives)."""
        return capabilities_of(self.spec.backend, self.info or None)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "backend": self.spec.backend, "state": self.state,
                "capabilities": self.capabilities,
                "error": self.error, "pid": self.pid, "restarts": self.restarts,
                "in_flight": self.in_flight, "ctx": self.info.get("ctx"),
                "slots": self.info.get("slots", 1), "aliases": self.spec.aliases,
                **{k: v for k, v in self.stats.items() if k in ("tokens_per_s", "busy", "queued", "wait_s")},
                **({"split": self.spec.config["split"]} if self.spec.config.get("split") else {})}

    # -------------------------------------------------------------- requests
    async def _wait_ready(self) -> None:
        if self.state == "stopped":
            raise Unavailable(f"model {self.id!r} was unloaded")
        if not self._ready.is_set():
            with trio.move_on_after(LOAD_TIMEOUT):
                await self._ready.wait()
        if self.state != "loaded" or self._stream is None:
            raise Unavailable(f"model {self.id!r} is not available: {self.error or self.state}")

    @asynccontextmanager
    async def open(self, request: Request) -> AsyncIterator[AsyncIterator[Event]]:
        """Send one request; yield the iterator of its events (it ends after the terminal
        one). Leaving the block before that cancels the request in the worker."""
        if self.in_flight >= self.max_queue:
            raise NoCapacity(f"model {self.id!r} has {self.in_flight} requests queued; "
                             "try again later")
        await self._wait_ready()
        rid = next(self._ids)
        send, recv = trio.open_memory_channel(math.inf)
        self._pending[rid] = send
        if getattr(request, "background", False):
            self._background.add(rid)
        finished = False
        try:
            await self._send({"op": "run", "id": rid, "request": encode_request(request)})

            async def events() -> AsyncIterator[Event]:
                nonlocal finished
                async for ev in coalesced(recv):
                    finished = isinstance(ev, TERMINAL)
                    yield ev

            yield events()
        finally:
            self._pending.pop(rid, None)
            self._background.discard(rid)
            if not finished and self._stream is not None:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(1):
                        try:
                            await self._send({"op": "cancel", "target": rid})
                        except MeshError:
                            pass

    async def _send(self, obj: dict[str, Any]) -> None:
        stream = self._stream
        if stream is None:
            raise WorkerDied(f"the worker for {self.id!r} is not running")
        async with self._send_lock:
            try:
                await stream.send_all(pack(obj))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise WorkerDied(f"the worker for {self.id!r} went away") from exc

    def _fail_pending(self, message: str, error: str = "WorkerDied") -> None:
        for send in list(self._pending.values()):
            try:
                send.send_nowait(Failed(error=error, message=message))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    # ------------------------------------------------------------ supervisor
    async def supervise(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the worker process, restarting it when it dies, until cancelled."""
        started = False
        backoff = Backoff()
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            try:
                while True:
                    backoff.started()
                    try:
                        await self._run_once(on_ready=(lambda: task_status.started(self))
                                             if not started else (lambda: None))
                        started = True
                    except _LoadFailed as exc:
                        self.state, self.error = "failed", str(exc)
                        self.on_change()
                        log.error("model %s failed to load: %s", self.id, exc)
                        if not started:
                            task_status.started(self)
                            started = True
                        self._ready.set()
                        return
                    self.restarts += 1
                    await backoff.wait()
            finally:
                self.state = "stopped" if self.state != "failed" else self.state
                self._fail_pending(f"model {self.id!r} was unloaded", error="Unavailable")
                self._ready.set()
                self.on_change()

    async def _poll_stats(self) -> None:
        """Ask the child for its figures (slots busy, queue, tokens/s) once per STATS_EVERY;
        the reply comes on the reserved id STATS_ID, outside the request bookkeeping."""
        while True:
            try:
                await self._send({"op": "stats", "id": STATS_ID})
            except MeshError:
                return
            await trio.sleep(STATS_EVERY)

    def _take_stats(self, data: dict[str, Any]) -> None:
        before = (self.stats.get("busy"), self.stats.get("queued"))
        self.stats = data
        if (data.get("busy"), data.get("queued")) != before:
            self.on_change()

    def stop(self) -> None:
        self.state = "stopped"
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def fail(self, reason: str) -> None:
        """Stop for good with `reason`, which its in-flight requests get as their error
        (a split model whose peer went away: node/splits.py)."""
        self._fail_pending(reason)
        self.stop()
        self.state, self.error = "failed", reason
        self.on_change()

    async def _run_once(self, on_ready: Callable[[], None]) -> None:
        """One life of the child: listen, spawn, load, serve frames until it exits."""
        listener, path = await self._listen()
        self._ready = trio.Event() if self._ready.is_set() else self._ready
        self.state = "loading"
        self.on_change()
        proc = await trio.lowlevel.open_process(self._command(path), stdin=subprocess.DEVNULL,
                                                start_new_session=True)
        self.pid = proc.pid
        try:
            stream = await self._handshake(listener, path, proc)
            log.info("model %s loaded (pid %s)", self.id, proc.pid)
            self.on_change()
            on_ready()
            try:
                await self._serve_frames()
            finally:
                self._stream = None
                await stream.aclose()
            code = await proc.wait()
            self.state, self.error = "loading", f"worker exited with status {code}; restarting"
            self._ready = trio.Event()
            log.warning("worker for %s exited (status %s); restarting", self.id, code)
            self._fail_pending(f"the worker serving {self.id!r} died (status {code}); "
                               "it is being restarted, retry the request")
            self.on_change()
        finally:
            path.unlink(missing_ok=True)
            with trio.CancelScope(shield=True):
                await terminate_process(proc)

    async def _listen(self) -> tuple[Any, Path]:
        """A Unix socket only this user can connect to (0600, under a 0700 directory)."""
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.run_dir / f"{_safe(self.id)}.sock"
        path.unlink(missing_ok=True)
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            await listener.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        listener.listen(1)
        return listener, path

    def _command(self, path: Path) -> list[str]:
        return [sys.executable, "-m", "node.worker_main", "--socket", str(path),
                "--backend", self.spec.backend, "--model", self.spec.path,
                "--config", json.dumps(self.spec.config)]

    async def _handshake(self, listener, path: Path, proc: trio.Process) -> trio.SocketStream:
        """Accept the child's connection and wait for `ready` (or its failure)."""
        try:
            with listener:
                with trio.fail_after(ACCEPT_TIMEOUT):
                    sock, _ = await listener.accept()
        except trio.TooSlowError:
            raise _LoadFailed(f"the worker did not start within {ACCEPT_TIMEOUT:.0f} s") from None
        path.unlink(missing_ok=True)
        stream = trio.SocketStream(sock)
        self._reader = FrameReader(stream)
        try:
            with trio.fail_after(LOAD_TIMEOUT):
                first = await self._reader.read()
        except trio.TooSlowError:
            raise _LoadFailed(f"the model did not load within {LOAD_TIMEOUT:.0f} s") from None
        except FrameError as exc:
            raise _LoadFailed(f"the worker sent a bad frame while loading: {exc}") from exc
        if first is None:
            code = await proc.wait()
            raise _LoadFailed(f"the worker exited with status {code} while loading")
        if first.get("type") == "fatal":
            raise _LoadFailed(first.get("error") or "load failed")
        self.info = first.get("info") or {}
        self._stream = stream
        self.state, self.error = "loaded", None
        self._ready.set()
        return stream

    async def _serve_frames(self) -> None:
        """Route the child's frames to their requests until it hangs up."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll_stats)
            while True:
                try:
                    frame = await self._reader.read()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                        FrameError):
                    frame = None
                if frame is None:
                    break
                rid = frame.get("id")
                if rid == STATS_ID:
                    self._take_stats(frame.get("stats") or {})
                    continue
                send = self._pending.get(rid)
                if send is None:
                    continue
                try:
                    ev = decode_event(frame.get("event"))
                except BadMessage as exc:
                    ev = Failed(error="BackendError", message=f"the worker sent {exc.message}")
                send.send_nowait(ev)
            nursery.cancel_scope.cancel()


async def coalesced(recv: trio.MemoryReceiveChannel) -> AsyncIterator[Event]:
    """A request's events up to its terminal one, what piled up while the consumer was
    busy (a slow client, a proxy write, a busy event loop) passed on as one Delta where
    that says the same (mesh/wire/inference.py merged): one event, one SSE chunk and one
    proxy frame per read of the consumer, not per token. A consumer that keeps up sees
    every event as the worker sent it."""
    held: Event | None = None
    while True:
        try:
            ev = held if held is not None else await recv.receive()
        except trio.EndOfChannel:
            return
        held = None
        while not isinstance(ev, TERMINAL):
            try:
                nxt = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            both = merged(ev, nxt)
            if both is None:
                held = nxt
                break
            ev = both
        yield ev
        if isinstance(ev, TERMINAL):
            return


class _LoadFailed(Exception):
    pass


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


class WorkerPool:
    """The loaded models of this node. `serve()` owns every worker's supervisor."""

    def __init__(self, run_dir: Path, *, max_queue: int = 64,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.run_dir = run_dir
        self.max_queue = max_queue
        self.on_change = on_change
        self.workers: dict[str, Worker] = {}
        self._cmd_send, self._cmd_recv = trio.open_memory_channel(64)

    def get(self, model_id: str) -> Worker | None:
        return self.workers.get(model_id)

    def find(self, name: str) -> Worker | None:
        w = self.workers.get(name)
        if w is not None:
            return w
        for w in self.workers.values():
            if name in w.spec.aliases:
                return w
        return None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            try:
                async for spec, reply in self._cmd_recv:
                    reply.send_nowait(self._start(nursery, spec))
            finally:
                for w in self.workers.values():
                    w.stop()

    def _start(self, nursery: trio.Nursery, spec: ModelSpec) -> Worker:
        old = self.workers.get(spec.id)
        if old is not None and old.state in ("loading", "loaded"):
            return old
        w = Worker(spec, self.run_dir, max_queue=self.max_queue, on_change=self.on_change)
        self.workers[spec.id] = w
        nursery.start_soon(w.supervise)
        return w

    async def load(self, spec: ModelSpec, *, wait: bool = True) -> Worker:
        """Start a model's worker; with wait=True return once it is loaded (or failed)."""
        reply_send, reply_recv = trio.open_memory_channel(1)
        await self._cmd_send.send((spec, reply_send))
        w = await reply_recv.receive()
        if wait:
            await w._ready.wait()
            if w.state == "failed":
                raise BadRequest(f"model {spec.id!r} failed to load: {w.error}",
                                 code="model_load_failed")
        return w

    async def unload(self, model_id: str) -> None:
        w = self.workers.pop(model_id, None)
        if w is None:
            raise NotFound(f"model {model_id!r} is not loaded", code="model_not_loaded")
        w.stop()
        self.on_change()

    def snapshot(self) -> list[dict[str, Any]]:
        return [w.describe() for w in self.workers.values()]


__all__ = ["ModelSpec", "Worker", "WorkerPool", "coalesced"]
