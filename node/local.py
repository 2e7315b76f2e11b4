"""This node's models as the router's LocalBackend (mesh/router.py): the worker pool."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from mesh.errors import Unavailable
from mesh.wire.inference import Event, Request
from node.workers import Worker, WorkerPool


class LocalModels:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def find(self, model: str) -> Worker | None:
        return self.pool.find(model)

    def model_cards(self) -> list[dict[str, Any]]:
        return [{"id": w.id, "object": "model", "created": int(w.started_at),
                 "owned_by": "inference-mesh", "capabilities": w.capabilities}
                for w in self.pool.workers.values() if w.state in ("loading", "loaded")]

    @asynccontextmanager
    async def open(self, model_id: str, request: Request) -> AsyncIterator[AsyncIterator[Event]]:
        worker = self.pool.get(model_id)
        if worker is None:
            raise Unavailable(f"model {model_id!r} was unloaded from this node")
        async with worker.open(request) as events:
            yield events
