"""What the API serves from: the node's façade over its pool, router, store and mesh.

Built once by the composition root (node/daemon.py) and handed to `api.app.create_app`;
the API reaches it as `current_app.config["MESH"]` and never imports node/ itself.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

from gallery.store import InstalledModel, Store, advertisement
from mesh.files import MeshFileFetcher
from mesh.router import Router
from mesh.wire.state import ModelState, NodeState, RpcState
from node import resources
from node.config import NodeConfig
from node.metrics import NodeMetrics
from node.workers import ModelSpec, WorkerPool

LOOPBACK = ("127.0.0.1", "localhost", "::1")
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
    files: Any = None        # node/uploads.py: /v1/files
    batches: Any = None      # node/batches.py: /v1/batches
    keyring: Any = None
    in_flight: Any = None    # mesh/keys.py InFlight: the per-key cap, HTTP and proxied
    nodes: Any = None        # mesh/nodes.py NodeBook: nodes admitted and revoked
    api_url: str = ""
    p2p: Any = None
    rpc: Any = None          # node/rpc_server.py: the RPC server this node lends (offer_memory)
    splits: Any = None       # node/splits.py: models split over peers
    responses: Any = None    # node/responses.py: stored Responses API objects, mesh-wide
    keepalive: Any = None    # node/keepalive.py: on-demand loads and idle unloads (Ollama)
    agents: Any = None       # node/agents: agent definitions, runs and schedules
    wanted: list[str] = field(default_factory=list)     # model ids this node serves
    startup_error: str | None = None
    started: float = field(default_factory=time.time)

    async def load_model(self, installed: InstalledModel):
        worker = await self.pool.load(spec_for(installed), wait=True)
        if self.keepalive is not None:       # loaded on purpose: no idle timer
            self.keepalive.pin(worker.id)
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

    def model_metadata(self, installed: InstalledModel) -> dict[str, Any]:
        """An installed llama model's GGUF header metadata (scalars and strings; {} for
        other formats or an unreadable file), read once per file version."""
        if installed.backend != "llama":
            return {}
        try:
            return _gguf_metadata(str(installed.path), installed.path.stat().st_mtime_ns)
        except (OSError, ValueError):
            return {}

    def is_open(self) -> bool:
        """No API key and an API reachable beyond this machine: anyone can use it."""
        return not self.keyring.enforcing and self.config.host not in LOOPBACK

    def node_state(self) -> NodeState:
        """What this node gossips each tick (mesh/wire/state.py)."""
        res = resources.read()
        models = []
        for w in list(self.pool.workers.values()):
            slots = w.slots
            models.append(ModelState(
                id=w.id, backend=w.spec.backend, state=w.state, ctx=int(w.info.get("ctx") or 0),
                capabilities=w.capabilities,
                slots=slots, busy=int(w.stats.get("busy", min(w.in_flight, slots))),
                queued=int(w.stats.get("queued", max(0, w.in_flight - slots))),
                tokens_per_s=float(w.stats.get("tokens_per_s") or 0.0),
                wait_s=float(w.stats.get("wait_s") or 0.0),
                aliases=list(w.spec.aliases), split=_split_summary(w),
                prefixes=sorted(self.router.local.prefixes(w.id))))
        return NodeState(name=self.node_name, version=VERSION, api_url=self.api_url,
                         ram_total=res.ram_total, ram_free=res.ram_free,
                         vram_total=res.vram_total, vram_free=res.vram_free, models=models,
                         rpc=self.rpc.state() if self.rpc else RpcState(),
                         load=res.load, open=self.is_open(), keys=self.keyring.wire(),
                         extra={**advertisement(self.store), **self._rtt_extra()})

    def _rtt_extra(self) -> dict[str, Any]:
        """This node's RTT to each peer (ms), gossiped so a dashboard can draw the mesh's
        links from any node (`/mesh/events`)."""
        if self.p2p is None:
            return {}
        return {"rtt_ms": {p.peer_id: round(p.rtt_ms, 2) for p in self.p2p.view.peers()
                           if p.rtt_ms is not None}}

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
            "models": [{**m, "prefixes": len(self.router.local.prefixes(m["id"]))}
                       for m in self.pool.snapshot()],
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
        # why this node's requests went where they did (mesh/router.py Target.reason)
        me_short["routes"] = dict(self.router.routes)
        if self.p2p:
            me_short.update(denied=self.p2p.denied_count,
                            rejected_gossip=self.p2p.rejected_gossip_count)
            sec = self.p2p.secrets
            if sec.in_grace():          # a token rotation (mesh/p2p/rekey.py) in its grace period
                warnings.append(f"mesh token rotated: the old token (mesh {sec.retiring.mesh_id}) "
                                f"stops working in {sec.retire_at - time.time():.0f} s")
        return {"self": me_short,
                "mesh": self.p2p.mesh_id if self.p2p else None, "nodes": nodes,
                "warnings": warnings}


def _split_summary(w) -> dict[str, Any] | None:
    """What peers see of a split model: the nodes holding parts and their layers."""
    split = w.spec.config.get("split")
    if not split:
        return None
    return {k: split.get(k) for k in ("nodes", "layers", "tensor_split", "failure")}


@functools.lru_cache(maxsize=16)
def _gguf_metadata(path: str, mtime_ns: int) -> dict[str, Any]:
    from node.placement import read_gguf
    return read_gguf(path)[0]
