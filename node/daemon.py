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

import contextlib
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
from mesh.files import PEER_SETTLE_S, MeshFileFetcher, advertisement
from mesh.files import PROTOCOL as FILES_PROTOCOL, make_handler as make_files_handler
from mesh.keys import KeyRing
from mesh.p2p import open_p2p
from mesh.peers import MeshPeers
from mesh.proxy import PROTOCOL as PROXY_PROTOCOL, Proxy, make_handler as make_proxy_handler
from mesh.token import parse_token
from mesh.tunnel import PROTOCOL as RPC_PROTOCOL, make_handler as make_rpc_handler
from mesh.wire import ModelState, NodeState, RpcState
from mesh.router import Router
from node import resources
from node.jobs import Jobs
from node.metrics import NodeMetrics
from node.rpc_server import RpcServer
from node.splits import Splits
from node.workers import ModelSpec, WorkerPool

log = logging.getLogger("node.daemon")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN_WARNING = ("the API listens on %s, beyond loopback, and the mesh has no API key: anyone "
                "who can reach it can use it (create one with `mesh keys create`)")
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
    rpc: Any = None          # node/rpc_server.py: the RPC server this node lends (offer_memory)
    splits: Any = None       # node/splits.py: models split over peers
    wanted: list[str] = field(default_factory=list)     # model ids this node serves
    startup_error: str | None = None
    started: float = field(default_factory=time.time)

    async def load_model(self, installed: InstalledModel):
        worker = await self.pool.load(spec_for(installed), wait=True)
        self.notify_changed()
        return worker

    async def unload_model(self, model_id: str) -> None:
        await self.pool.unload(model_id)
        if model_id in self.wanted:          # unloaded on purpose: readiness no longer waits for it
            self.wanted.remove(model_id)
        self.notify_changed()

    def notify_changed(self) -> None:
        if self.p2p is not None:
            self.p2p.notify_changed()

    def peer_fetchers(self, settle_s: float = 0.0) -> list:
        """Where the installer asks for pinned files before their origin: the mesh, if any."""
        return [MeshFileFetcher(self.p2p, settle_s=settle_s)] if self.p2p is not None else []

    def is_open(self) -> bool:
        """No API key and an API reachable beyond this machine: anyone can use it."""
        return not self.keyring.enforcing and self.config.host not in LOOPBACK

    def node_state(self) -> NodeState:
        """What this node gossips each tick (mesh/wire.py)."""
        res = resources.read()
        models = []
        for w in list(self.pool.workers.values()):
            slots = int(w.stats.get("slots") or w.info.get("slots") or 1)
            models.append(ModelState(
                id=w.id, backend=w.spec.backend, state=w.state, ctx=int(w.info.get("ctx") or 0),
                slots=slots, busy=int(w.stats.get("busy", min(w.in_flight, slots))),
                queued=int(w.stats.get("queued", max(0, w.in_flight - slots))),
                tokens_per_s=float(w.stats.get("tokens_per_s") or 0.0),
                aliases=list(w.spec.aliases), split=_split_summary(w)))
        return NodeState(name=self.node_name, version=VERSION, api_url=self.api_url,
                         ram_total=res.ram_total, ram_free=res.ram_free,
                         vram_total=res.vram_total, vram_free=res.vram_free, models=models,
                         rpc=self.rpc.state() if self.rpc else RpcState(),
                         load=res.load, open=self.is_open(), keys=self.keyring.wire(),
                         extra=advertisement(self.store))

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
            "open": self.is_open(),
            "rpc": self.rpc.describe() if self.rpc else {"offered": 0, "free": 0},
        }

    def status(self) -> dict[str, Any]:
        me = self.self_status()
        nodes = [me] + (self.p2p.view.status_nodes() if self.p2p else [])
        warnings = [f"node {n['name']!r} serves its API beyond loopback with no API key: "
                    "anyone who can reach it can use it" for n in nodes if n.get("open")]
        me_short = {k: me[k] for k in ("id", "name", "addrs", "api")}
        if self.p2p:
            me_short.update(denied=self.p2p.denied_count,
                            rejected_gossip=self.p2p.rejected_gossip_count)
        return {"self": me_short,
                "mesh": self.p2p.mesh_id if self.p2p else None, "nodes": nodes,
                "warnings": warnings}


def _split_summary(w) -> dict[str, Any] | None:
    """What peers see of a split model: the nodes holding parts and their layers."""
    split = w.spec.config.get("split")
    if not split:
        return None
    return {k: split.get(k) for k in ("nodes", "layers", "tensor_split", "failure")}


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

                installed = await install(entry, svc.store, progress=progress,
                                          peer_fetchers=svc.peer_fetchers(PEER_SETTLE_S))
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
    token = parse_token(config.token) if config.token else None
    store = Store(config.models_path)
    index = load_index(config.gallery)
    names = [] if config.no_models else list(config.models)
    wanted = []
    for name in names:               # unknown ids fail before anything starts
        installed = store.get(name)
        wanted.append(installed.id if installed else resolve(index, name).id)

    async with contextlib.AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        pool = WorkerPool(config.run_dir, max_queue=config.max_queue)
        await nursery.start(pool.serve)
        router = Router(pool)
        svc = Services(config=config, node_name=config.name, pool=pool, router=router,
                       store=store, index=index, metrics=NodeMetrics(pool), wanted=wanted,
                       keyring=KeyRing(config.home))
        pool.on_change = svc.notify_changed
        svc.jobs = await nursery.start(Jobs(store, peer_fetchers=svc.peer_fetchers,
                                            after_install=svc.load_model).serve)
        app = create_app(svc)

        shutdown = trio.Event()
        if token is not None:
            p2p = await stack.enter_async_context(open_p2p(
                home=config.home, token=token, name=config.name, listen_host=config.host,
                p2p_port=config.p2p_port, peers=config.peers, mdns=config.mdns,
                state=svc.node_state))
            svc.keyring.node_id = p2p.peer_id
            svc.p2p = p2p
            router.peers = MeshPeers(p2p.view)
            svc.proxy = Proxy(p2p, router, request_timeout=config.request_timeout)
            p2p.set_handler(PROXY_PROTOCOL, make_proxy_handler(app, max_body=config.max_body_bytes))
            if config.offer_memory > 0:
                svc.rpc = RpcServer(home=config.home, offered=config.offer_memory,
                                    threads=config.rpc_threads, on_change=svc.notify_changed)
                await nursery.start(svc.rpc.serve)
            p2p.set_handler(RPC_PROTOCOL, make_rpc_handler(svc.rpc))
            svc.splits = await nursery.start(Splits(pool=pool, p2p=p2p, threads=config.rpc_threads,
                                                    stopping=shutdown.is_set).serve)
            p2p.set_handler(FILES_PROTOCOL, make_files_handler(store))
            nursery.start_soon(_merge_gossiped_keys, svc)
            for addr in p2p.addrs:
                say(f"p2p {addr}")

        hc = HypercornConfig()
        hc.bind = [_bind(config.host, config.port)]
        hc.backlog = 1024
        hc.graceful_timeout = SHUTDOWN_GRACE
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hypercorn.error")
        binds = await nursery.start(lambda task_status: hypercorn_serve(
            app, hc, shutdown_trigger=shutdown.wait, task_status=task_status))
        url = (binds[0] if binds else f"http://{_bind(config.host, config.port)}").rstrip("/")
        svc.api_url = url
        say(f"api {url}/v1")
        if svc.is_open():
            log.warning(OPEN_WARNING, config.host)
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


async def _merge_gossiped_keys(svc: Services) -> None:
    """Fold the key records peers gossip into ours; re-gossip when ours changed."""
    view = svc.p2p.view
    while True:
        changed = view.changed
        merged = False
        for peer in view.peers():
            if peer.state.keys:
                try:
                    merged |= svc.keyring.merge(peer.state.keys)
                except ValueError as exc:   # pydantic: a malformed record from a peer
                    log.warning("ignored bad key records from %s: %s", peer.name, exc)
        if merged:
            svc.notify_changed()
        await changed.wait()
