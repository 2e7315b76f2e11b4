"""Child processes of the node: stop one politely, and the back-off between restarts.

Used by the model workers (node/workers.py) and the RPC server (node/rpc_server.py).
"""

from __future__ import annotations

import signal
import time

import trio

STOP_GRACE = 2.0                         # SIGTERM -> SIGKILL
RESTART_BACKOFF = (0.2, 1.0, 3.0, 10.0)  # seconds, while a child keeps dying quickly
QUICK_DEATH_S = 60.0                     # a child that lived longer starts the ladder again


async def terminate_process(proc: trio.Process) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE; returns once the process is gone."""
    if proc.returncode is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    with trio.move_on_after(STOP_GRACE):
        await proc.wait()
        return
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    await proc.wait()


class Backoff:
    """Delay before the next restart: climbs RESTART_BACKOFF while runs end quickly."""

    def __init__(self) -> None:
        self.restarts = 0
        self._t0 = time.monotonic()

    def started(self) -> None:
        self._t0 = time.monotonic()

    async def wait(self) -> float:
        quick = time.monotonic() - self._t0 < QUICK_DEATH_S
        delay = (RESTART_BACKOFF[min(self.restarts, len(RESTART_BACKOFF) - 1)] if quick
                 else RESTART_BACKOFF[0])
        self.restarts += 1
        await trio.sleep(delay)
        return delay
