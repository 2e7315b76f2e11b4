"""Prometheus metrics of one node, named as llama-server's operators already graph them.

Gauges are computed at scrape time from the worker pool (a custom collector), so there
is no second copy of the state to keep in sync; counters are kept by the API.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from node import resources


class _PoolCollector:
    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self):
        labels = ["model"]
        loaded = GaugeMetricFamily("mesh_model_loaded", "1 when the model's worker is ready", labels=labels)
        processing = GaugeMetricFamily("mesh_requests_processing", "requests in a slot", labels=labels)
        deferred = GaugeMetricFamily("mesh_requests_deferred", "requests waiting for a slot", labels=labels)
        tps = GaugeMetricFamily("mesh_predicted_tokens_seconds", "recent decode speed, tokens/s", labels=labels)
        restarts = GaugeMetricFamily("mesh_worker_restarts", "worker process restarts", labels=labels)
        for w in list(self.pool.workers.values()):
            slots = int(w.info.get("slots") or 1)
            loaded.add_metric([w.id], 1.0 if w.state == "loaded" else 0.0)
            processing.add_metric([w.id], min(w.in_flight, slots))
            deferred.add_metric([w.id], max(0, w.in_flight - slots))
            tps.add_metric([w.id], float(w.stats.get("tokens_per_s") or 0.0))
            restarts.add_metric([w.id], w.restarts)
        res = resources.read()
        ram = GaugeMetricFamily("mesh_memory_free_bytes", "free memory", labels=["kind"])
        ram.add_metric(["ram"], res.ram_free)
        ram.add_metric(["vram"], res.vram_free)
        yield from (loaded, processing, deferred, tps, restarts, ram)


class NodeMetrics:
    def __init__(self, pool) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_PoolCollector(pool))
        self.requests = Counter("mesh_http_requests", "HTTP requests served",
                                ["route", "status"], registry=self.registry)
