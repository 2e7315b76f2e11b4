"""The discrete-event loop: a heap of (time, order, callback, args) on a virtual clock.

Nothing here knows about meshes. ``at``/``after`` schedule a plain function; ``run``
pops events in time order (ties in scheduling order, so a run is deterministic for a
seed) and sets ``now`` before each call. Simulated time never waits for wall time.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable

__all__ = ["Loop"]


class Loop:
    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0                       # callbacks run (a measure of simulator work)
        self._q: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._order = itertools.count()

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._q, (max(t, self.now), next(self._order), fn, args))

    def after(self, dt: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + dt, fn, *args)

    def every(self, period: float, fn: Callable[[], None], *, phase: float = 0.0) -> None:
        """Call ``fn`` every ``period`` s from ``now + phase``, for the whole run."""
        def tick() -> None:
            fn()
            self.after(period, tick)
        self.after(phase, tick)

    def run(self, until: float) -> None:
        q = self._q
        pop = heapq.heappop
        while q and q[0][0] <= until:
            t, _, fn, args = pop(q)
            self.now = t
            self.events += 1
            fn(*args)
        self.now = until
