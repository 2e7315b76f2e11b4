"""`mesh up`: one trio nursery holding the worker pool, the mesh and the HTTP API.

Start-up order (each step `nursery.start`-ed, so the next one sees it ready):
  1. resolve the models to serve against the gallery (an unknown id fails at once);
  2. the worker pool;
  3. Hypercorn serving the Quart app (port 0 picks a free port); the node prints
     `mesh: api http://HOST:PORT/v1` on stdout;
  4. in the background: install missing models (gallery), load them; `/readyz` turns 200
     and the node prints `mesh: ready` once every model is loaded.

Shutdown (Ctrl-C, SIGTERM): Hypercorn stops accepting, open requests get
SHUTDOWN_GRACE seconds, then everything left is cancelled, streams included (a client
that stops reading would otherwise hold Hypercorn forever), and the worker processes
are terminated. The whole takes < 5 s.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from gallery.catalog import load_index, resolve
from gallery.installer import install
from gallery.store import InstalledModel, Store
from mesh.config import NodeConfig
from mesh.errors import MeshError
from mesh.keys import KeyRing
from mesh.router import Router
from node import resources
from node.jobs import Jobs
from node.metrics import NodeMetrics
from node.workers import ModelSpec, WorkerPool

log = logging.getLogger("node.daemon")

SHUTDOWN_GRACE = 2.0     # seconds open requests get after Ctrl-C; workers get 2 s more
VERSION = "0.1.0"


def say(line: str) -> None:
    """A line for the user (and for tests that start `mesh up`) on stdout."""
    print(f"mesh: {line}", flush=True)


def spec_for(m: InstalledModel) -> ModelSpec:
    return ModelSpec(id=m.id, backend=m.backend, path=str(m.path), config=dict(m.config),
                     aliases=list(m.aliases))


@dataclass
class Services:
    """Everything the API serves from, built once by the daemon."""
    config: NodeConfig
    node_name: str
    pool: WorkerPool
    router: Router
    store: Store
    index: dict[str, Any]
    metrics: NodeMetrics
    jobs: Any = None
    keyring: Any = None
    api_url: str = ""
    proxy: Any = None
    p2p: Any = None
    wanted: list[str] = field(default_factory=list)     # model ids this node serves
    startup_error: str | None = None
    started: float = field(default_factory=time.time)

    async def load_model(self, installed: InstalledModel):
        worker = await self.pool.load(spec_for(installed), wait=True)
        self.notify_changed()
        return worker

    async def unload_model(self, model_id: str) -> None:
        await self.pool.unload(model_id)
        self.notify_changed()

    def notify_changed(self) -> None:
        if self.p2p is not None:
            self.p2p.notify_changed()

    def is_proxied(self, request) -> bool:
        """True for a request a mesh peer forwarded to us (it must not hop again)."""
        return bool(request.scope.get("extensions", {}).get("mesh.peer"))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        models = {}
        for mid in self.wanted:
            w = self.pool.get(mid)
            models[mid] = w.state if w is not None else "installing"
        ready = self.startup_error is None and all(s == "loaded" for s in models.values())
        detail: dict[str, Any] = {"models": models}
        if self.startup_error:
            detail["error"] = self.startup_error
        return ready, detail

    def self_status(self) -> dict[str, Any]:
        res = resources.read()
        return {
            "id": self.p2p.peer_id if self.p2p else None,
            "name": self.node_name,
            "version": VERSION,
            "api": self.api_url,
            "addrs": list(self.p2p.addrs) if self.p2p else [],
            "state": "alive",
            "last_seen": time.time(),
            "uptime_s": round(time.time() - self.started, 1),
            "models": self.pool.snapshot(),
            "memory": {"ram_total": res.ram_total, "ram_free": res.ram_free,
                       "vram_total": res.vram_total, "vram_free": res.vram_free,
                       "gpus": [vars(g) for g in res.gpus]},
            "load": res.load,
        }

    def status(self) -> dict[str, Any]:
        me = self.self_status()
        nodes = [me] + (self.p2p.view.status_nodes() if self.p2p else [])
        return {"self": {k: me[k] for k in ("id", "name", "addrs", "api")},
                "mesh": bool(self.p2p), "nodes": nodes}


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _install_and_load(svc: Services, names: list[str]) -> None:
    """Install what is missing, then load every model; failures are reported, not fatal."""
    for name in names:
        try:
            installed = svc.store.get(name)
            if installed is None:
                entry = resolve(svc.index, name)
                say(f"installing {entry.id} from the gallery")
                last = [0.0]

                def progress(p, _last=last):
                    now = time.monotonic()
                    if p.state in ("done", "failed") or now - _last[0] > 5:
                        _last[0] = now
                        log.info("install %s: %s %s/%s bytes", p.id, p.state, p.bytes_done,
                                 p.bytes_total)

                installed = await install(entry, svc.store, progress=progress)
            await svc.pool.load(spec_for(installed), wait=True)
            log.info("loaded %s", installed.id)
        except MeshError as exc:
            svc.startup_error = f"{name}: {exc.message}"
            say(f"error: {svc.startup_error}")
            return
    ready, _ = svc.readiness()
    if ready:
        say(f"ready ({', '.join(svc.wanted) or 'no models'})")


async def serve_node(config: NodeConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run one node until cancelled or signalled."""
    from api.app import create_app   # the API imports the node's modules, not the reverse

    config.home.mkdir(parents=True, exist_ok=True)
    os.chmod(config.home, 0o700)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.models_path)
    index = load_index(config.gallery)
    names = [] if config.no_models else list(config.models)
    wanted = []
    for name in names:               # unknown ids fail before anything starts
        installed = store.get(name)
        wanted.append(installed.id if installed else resolve(index, name).id)

    async with trio.open_nursery() as nursery:
        pool = WorkerPool(config.run_dir, max_queue=config.max_queue)
        await nursery.start(pool.serve)
        router = Router(pool)
        svc = Services(config=config, node_name=config.name, pool=pool, router=router,
                       store=store, index=index, metrics=NodeMetrics(pool), wanted=wanted)
        pool.on_change = svc.notify_changed
        svc.keyring = KeyRing(config.home)
        svc.jobs = await nursery.start(Jobs(store, after_install=svc.load_model).serve)
        app = create_app(svc)

        hc = HypercornConfig()
        hc.bind = [_bind(config.host, config.port)]
        hc.backlog = 1024
        hc.graceful_timeout = SHUTDOWN_GRACE
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hypercorn.error")
        shutdown = trio.Event()
        binds = await nursery.start(lambda task_status: hypercorn_serve(
            app, hc, shutdown_trigger=shutdown.wait, task_status=task_status))
        url = (binds[0] if binds else f"http://{_bind(config.host, config.port)}").rstrip("/")
        svc.api_url = url
        say(f"api {url}/v1")
        if config.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("the API listens beyond loopback on %s with no API keys: anyone who can "
                        "reach it can use it", config.host)
        nursery.start_soon(_install_and_load, svc, wanted)
        task_status.started(svc)

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                say(f"{signal.Signals(signum).name}: shutting down")
                break
        shutdown.set()
        # Open requests get the grace period; then everything is cancelled.
        nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE + 0.5
        for w in pool.workers.values():
            w.stop()
