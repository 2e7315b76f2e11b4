"""This node's models as the router's LocalBackend (mesh/router.py): the worker pool, and
the book of what its slots hold (mesh/prefix.py), written as generations finish here."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from mesh.errors import Unavailable
from mesh.prefix import PrefixBook, chain, next_link
from mesh.wire.inference import Delta, Done, Event, Generate, Request
from node.workers import Worker, WorkerPool


class LocalModels:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.book = PrefixBook()
        self._epoch: dict[str, tuple[float, int]] = {}   # a worker's life the book is of

    def prefixes(self, model_id: str) -> frozenset[int]:
        """Prefix hashes this node's slots hold for the model (mesh/prefix.py)."""
        w = self.pool.get(model_id)
        if w is None or self._epoch.get(model_id) != (w.started_at, w.restarts):
            return frozenset()           # unloaded or restarted since: its slots are empty
        return self.book.held(model_id)

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
            if isinstance(request, Generate) and request.n == 1 and worker.spec.backend == "llama":
                yield self._recorded(worker, request, events)
            else:
                yield events

    async def _recorded(self, worker: Worker, req: Generate,
                        events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """Pass the events on; once the generation is done, book what its slot holds."""
        text: list[str] = []
        calls: list = []
        async for ev in events:
            if isinstance(ev, Delta):
                text.append(ev.text)
                calls.extend(ev.tool_calls)
            elif isinstance(ev, Done):
                if self._epoch.get(worker.id) != (worker.started_at, worker.restarts):
                    self.book.forget(worker.id)
                    self._epoch[worker.id] = (worker.started_at, worker.restarts)
                self.book.served(worker.id, worker.slots, chain(req),
                                 next_link(req, "".join(text), calls))
            yield ev
