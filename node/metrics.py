"""Prometheus metrics: this node's (`/metrics`) and the whole mesh's (`/mesh/metrics`).

`/metrics` uses llama-server's metric names where they mean the same, with `mesh_` in
place of its `llamacpp:` prefix and a `model` label (one node serves several models):

    mesh_requests_processing, mesh_requests_deferred   requests in a slot / waiting for one
    mesh_expected_wait_seconds                         what a request sent now would wait for
                                                       a slot (the worker's `wait_s`: queue
                                                       place x mean slot hold time / slots)
    mesh_predicted_tokens_seconds                      recent decode speed (tokens/s)
    mesh_prompt_tokens_total, mesh_tokens_predicted_total   tokens of requests served here
    mesh_kv_cache_usage_ratio, mesh_kv_cache_tokens    when the worker reports its KV cells
                                                       (`kv_used`, `kv_size` in its stats)

and the node's and mesh's own: mesh_model_loaded, mesh_worker_restarts,
mesh_memory_free_bytes, mesh_http_requests_total, mesh_peers{state},
mesh_gossip_age_seconds{peer}, mesh_proxied_requests_total{peer} (sent to a peer),
mesh_proxied_failures_total{peer} (failed there before their first event),
mesh_proxy_served_total{peer} (served here for a peer), mesh_router_retries_total.

Gauges are read at scrape time from the worker pool and the view (custom collectors), so
no second copy of the state is kept. Counters come from thin wrappers the composition
root puts around the router's LocalBackend (`local()`), PeerTransport (`transport()`) and
the proxy handler (`inbound()`): each sees every event of a request and counts it once.

Retries: Router.open tries its candidates one after another in the caller's task, so a
start that fails (no first event) leaves a mark in a ContextVar of that task; the next
attempt at the same request (same fields, any target's model id) counts one retry. (So
would the caller sending the very same request again from the same task after a total
failure: that is a retry too, by the caller.)

`/mesh/metrics` is one scrape for the whole mesh built from gossip, not from scraping
peers: this node's own NodeState (as it gossips it) and the latest NodeState of every peer
in the view (mesh/wire/state.py), labelled by `node`. It is as fresh as gossip (a state a
second, suspect peers kept with their last figures and `mesh_node_alive 0`); every HELP
line says so.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from mesh.wire.inference import Delta, Done, Failed, Heartbeat, Result
from node import resources

_FAILED_START: ContextVar[Any] = ContextVar("mesh_failed_start", default=None)
GOSSIPED = " (from gossiped node state, labelled by node; as old as mesh_node_gossip_age_seconds)"
GOSSIP = " (from gossiped node state, labelled by node)"


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class _PoolCollector:
    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self):
        m = ["model"]
        loaded = _gauge("mesh_model_loaded", "1 when the model's worker is ready", m)
        processing = _gauge("mesh_requests_processing", "Number of requests processing (in a slot)", m)
        deferred = _gauge("mesh_requests_deferred", "Number of requests deferred (waiting for a slot)", m)
        tps = _gauge("mesh_predicted_tokens_seconds", "Recent generation throughput in tokens/s", m)
        wait = _gauge("mesh_expected_wait_seconds", "Expected seconds a request sent now waits "
                      "for a slot (0: a slot is free)", m)
        restarts = _gauge("mesh_worker_restarts", "worker process restarts", m)
        kv_ratio = _gauge("mesh_kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage", m)
        kv_tokens = _gauge("mesh_kv_cache_tokens", "KV-cache tokens", m)
        for w in list(self.pool.workers.values()):
            slots, stats = w.slots, w.stats
            loaded.add_metric([w.id], 1.0 if w.state == "loaded" else 0.0)
            processing.add_metric([w.id], int(stats.get("busy", min(w.in_flight, slots))))
            deferred.add_metric([w.id], int(stats.get("queued", max(0, w.in_flight - slots))))
            tps.add_metric([w.id], float(stats.get("tokens_per_s") or 0.0))
            wait.add_metric([w.id], float(stats.get("wait_s") or 0.0))
            restarts.add_metric([w.id], w.restarts)
            if stats.get("kv_size"):
                kv_tokens.add_metric([w.id], int(stats.get("kv_used") or 0))
                kv_ratio.add_metric([w.id], int(stats.get("kv_used") or 0) / int(stats["kv_size"]))
        res = resources.read()
        ram = _gauge("mesh_memory_free_bytes", "free memory", ["kind"])
        ram.add_metric(["ram"], res.ram_free)
        ram.add_metric(["vram"], res.vram_free)
        yield from (loaded, processing, deferred, wait, tps, restarts, ram)
        yield from (g for g in (kv_ratio, kv_tokens) if g.samples)


class _ViewCollector:
    """Peers by state and the age of each one's latest gossiped state."""

    def __init__(self, metrics: "NodeMetrics") -> None:
        self.metrics = metrics

    def collect(self):
        view = self.metrics.view
        if view is None:
            return
        peers = _gauge("mesh_peers", "peers in this node's view, by state", ["state"])
        age = _gauge("mesh_gossip_age_seconds", "seconds since the peer's latest state arrived",
                     ["peer"])
        counts = {"alive": 0, "suspect": 0}
        now = time.time()
        for p in view.peers():
            counts[p.status] = counts.get(p.status, 0) + 1
            age.add_metric([p.name], max(0.0, now - p.last_seen_wall))
        for state, n in counts.items():
            peers.add_metric([state], n)
        yield peers
        yield age


class _Tap:
    """An event iterator that reports each event it passes on."""

    def __init__(self, events, on_event: Callable[[Any], None]) -> None:
        self.events, self.on_event, self.started = events, on_event, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        ev = await self.events.__anext__()
        if not isinstance(ev, (Heartbeat, Failed)):
            self.started = True
        self.on_event(ev)
        return ev


def _same_request(request) -> Any:
    return request.model_copy(update={"model": ""})


class NodeMetrics:
    """The node's registry and the wrappers that feed its counters. The composition root
    sets `view` (with a mesh) and `state` (this node's NodeState, for `/mesh/metrics`)."""

    def __init__(self, pool) -> None:
        self.view = None
        self.state: Callable[[], Any] | None = None
        self.registry = r = CollectorRegistry()
        r.register(_PoolCollector(pool))
        r.register(_ViewCollector(self))
        self.requests = Counter("mesh_http_requests", "HTTP requests served",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("mesh_prompt_tokens", "Number of prompt tokens processed "
                                     "(requests served here)", ["model"], registry=r)
        self.predicted_tokens = Counter("mesh_tokens_predicted", "Number of generation tokens "
                                        "processed (requests served here)", ["model"], registry=r)
        self.proxied = Counter("mesh_proxied_requests", "requests this node sent to a peer",
                               ["peer"], registry=r)
        self.proxied_failed = Counter("mesh_proxied_failures", "requests sent to a peer that "
                                      "failed there before their first event", ["peer"], registry=r)
        self.served_for_peers = Counter("mesh_proxy_served", "requests served here for a peer "
                                        "that proxied them", ["peer"], registry=r)
        self.retries = Counter("mesh_router_retries", "times the router moved a request to its "
                               "next candidate after one failed to start it", registry=r)

    # ------------------------------------------------------------ wrappers
    def _attempt(self, request) -> Any:
        key = _same_request(request)
        if _FAILED_START.get() == key:
            self.retries.inc()
        _FAILED_START.set(None)
        return key

    def _count_tokens(self, model: str):
        def on_event(ev) -> None:
            if isinstance(ev, Done):
                self.prompt_tokens.labels(model).inc(ev.usage.prompt_tokens)
                self.predicted_tokens.labels(model).inc(ev.usage.completion_tokens)
        return on_event

    def local(self, inner) -> "_CountingLocal":
        return _CountingLocal(inner, self)

    def transport(self, inner) -> "_CountingTransport":
        return _CountingTransport(inner, self)

    def inbound(self, handler):
        """The proxy's stream handler, counting the requests it serves per peer."""
        async def handle(stream, peer_id: str) -> None:
            peer = self.view.get(peer_id) if self.view is not None else None
            self.served_for_peers.labels(peer.name if peer else peer_id[-8:]).inc()
            await handler(stream, peer_id)
        return handle

    # ------------------------------------------------------------ the mesh
    def mesh_scrape(self) -> bytes:
        """`/mesh/metrics`: every node's gossiped figures in one Prometheus text page."""
        reg = CollectorRegistry()
        reg.register(_MeshCollector(self))
        return generate_latest(reg)


class _CountingLocal:
    def __init__(self, inner, metrics: NodeMetrics) -> None:
        self.inner, self.metrics = inner, metrics

    def find(self, model: str):
        return self.inner.find(model)

    def model_cards(self):
        return self.inner.model_cards()

    def prefixes(self, model_id: str) -> frozenset[int]:
        return self.inner.prefixes(model_id)

    @asynccontextmanager
    async def open(self, model_id: str, request):
        key = self.metrics._attempt(request)
        tap = None
        try:
            async with self.inner.open(model_id, request) as events:
                tap = _Tap(events, self.metrics._count_tokens(model_id))
                yield tap
        finally:
            if tap is None or not tap.started:
                _FAILED_START.set(key)


class _CountingTransport:
    def __init__(self, inner, metrics: NodeMetrics) -> None:
        self.inner, self.metrics = inner, metrics

    @asynccontextmanager
    async def open(self, peer, request, *, caller, deadline):
        key = self.metrics._attempt(request)
        self.metrics.proxied.labels(peer.name).inc()
        tap = None
        try:
            async with self.inner.open(peer, request, caller=caller, deadline=deadline) as events:
                tap = _Tap(events, lambda ev: None)
                yield tap
        finally:
            if tap is None or not tap.started:
                self.metrics.proxied_failed.labels(peer.name).inc()
                _FAILED_START.set(key)


class _MeshCollector:
    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def _states(self):
        """(node name, alive, gossip age s, NodeState) of this node and every peer."""
        now = time.time()
        if self.metrics.state is not None:
            mine = self.metrics.state()
            yield mine.name, True, 0.0, mine
        if self.metrics.view is not None:
            for p in self.metrics.view.peers():
                yield p.name, p.status == "alive", max(0.0, now - p.last_seen_wall), p.state

    def collect(self):
        n, nm = ["node"], ["node", "model"]
        g = {
            "alive": _gauge("mesh_node_alive", "1 while the node's gossip arrives, 0 when suspect" + GOSSIPED, n),
            "age": _gauge("mesh_node_gossip_age_seconds", "seconds since the node's latest state arrived (0: the node answering this scrape)" + GOSSIP, n),
            "ram_total": _gauge("mesh_node_ram_total_bytes", "RAM" + GOSSIPED, n),
            "ram_free": _gauge("mesh_node_ram_free_bytes", "free RAM" + GOSSIPED, n),
            "vram_total": _gauge("mesh_node_vram_total_bytes", "GPU memory" + GOSSIPED, n),
            "vram_free": _gauge("mesh_node_vram_free_bytes", "free GPU memory" + GOSSIPED, n),
            "load": _gauge("mesh_node_load", "load average per core" + GOSSIPED, n),
            "rpc_offered": _gauge("mesh_node_rpc_offered_bytes", "memory lent to split models" + GOSSIPED, n),
            "rpc_free": _gauge("mesh_node_rpc_free_bytes", "lent memory still free" + GOSSIPED, n),
            "loaded": _gauge("mesh_model_loaded", "1 when the model is loaded on the node" + GOSSIPED, nm),
            "slots": _gauge("mesh_model_slots", "the model's slots (concurrent sequences)" + GOSSIPED, nm),
            "busy": _gauge("mesh_requests_processing", "Number of requests processing" + GOSSIPED, nm),
            "queued": _gauge("mesh_requests_deferred", "Number of requests deferred" + GOSSIPED, nm),
            "tps": _gauge("mesh_predicted_tokens_seconds", "Recent generation throughput in tokens/s" + GOSSIPED, nm),
            "wait": _gauge("mesh_expected_wait_seconds", "Expected seconds a request sent now waits for a slot" + GOSSIPED, nm),
        }
        for name, alive, age, s in self._states():
            for key, value in (("alive", 1 if alive else 0), ("age", age),
                               ("ram_total", s.ram_total), ("ram_free", s.ram_free),
                               ("vram_total", s.vram_total), ("vram_free", s.vram_free),
                               ("load", s.load), ("rpc_offered", s.rpc.offered),
                               ("rpc_free", s.rpc.free)):
                g[key].add_metric([name], value)
            for m in s.models:
                for key, value in (("loaded", 1 if m.state == "loaded" else 0), ("slots", m.slots),
                                   ("busy", m.busy), ("queued", m.queued),
                                   ("tps", m.tokens_per_s), ("wait", m.wait_s)):
                    g[key].add_metric([name, m.id], value)
        yield from g.values()
