"""Parent side of the llama.cpp RPC server this node lends (`offer_memory > 0`).

`RpcServer.serve` runs `python -m node.rpc` (node/rpc.py is the child) in a network
namespace of its own, bound to that namespace's 127.0.0.1 on a free port, with its tensor
cache under `<home>/rpc-cache` (llama.cpp keeps weights over 10 MiB there by hash and
skips sending them on the next load; a lender that holds the model file gets every tensor
from it instead: mesh/tunnel.py, FILL), and restarts it when it dies (back-off 0.2, 1, 3,
10 s while it keeps dying quickly). No other process can reach it: `connect()` asks the
child for a connection over the control socket it inherited (node/isolation.py), and
peers reach the server only through `/mesh/rpc/2` (mesh/tunnel.py), whose handler calls
`connect()`. Where the kernel refuses namespaces the server binds the host's loopback
and `isolation` says `none: <why>` (gossiped in `rpc.isolation`; MESH_RPC_ISOLATE=0 turns
the namespace off, for a comparison).

Readiness: the server prints nothing when it starts listening, and a probe connection
would count as a client, so the child watches its own /proc/net/tcp and says `ready` on
the control socket, up to READY_TIMEOUT.

Memory: llama.cpp's server reports its host's RAM, not what it lends, so the figure
gossiped as `rpc.free` is `offered - used`, where `used` is the growth of the server
process's resident memory while a client is connected: the buffers it allocated and
filled (weights, KV cache, compute). When the client leaves, the server frees them
(MALLOC_MMAP_THRESHOLD_ makes them mmap'ed, so they really leave), `used` is 0 and the
baseline is taken again. It is read once per STATS_EVERY and a change of more
than CHANGE_BYTES is published at once. The child's stdout says when a client connects
and leaves ("Accepted client connection" / "Client connection closed").
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import psutil
import trio

from mesh.tunnel import Lender
from mesh.wire.state import RpcState
from node.isolation import recv_socket
from node.processes import Backoff, terminate_process

log = logging.getLogger("node.rpc_server")

READY_TIMEOUT = 20.0     # s from spawn to a listening socket (imports + ggml init: ~1 s)
STATS_EVERY = 1.0        # the gossip tick
CHANGE_BYTES = 1 << 20   # publish a change of rpc.free larger than this at once
MMAP_THRESHOLD = 1 << 20 # malloc: allocations this large get their own mapping


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RpcServer:
    """The RPC server process this node lends; valid across restarts."""

    def __init__(self, *, home: Path, offered: int, threads: int = 0,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.home = home
        self.offered = offered
        self.threads = threads
        self.on_change = on_change
        self.cache_dir = home / "rpc-cache"
        self.port: int | None = None       # set while the server listens
        self.pid: int | None = None
        self.isolation = ""                # node/isolation.py: "netns" or "none: <why>"
        self.isolate = os.environ.get("MESH_RPC_ISOLATE", "1").lower() not in ("0", "false", "no", "off")
        self._ctrl: trio.socket.SocketType | None = None
        self._ctrl_lock = trio.Lock()
        self.restarts = 0
        self.clients = 0                   # connections the server is serving (0 or 1)
        self.lender = Lender()             # which peer holds the server (mesh/tunnel.py)
        self._baseline = 0
        self._used = 0
        self._ready = trio.Event()

    # ------------------------------------------------------------------ state
    def endpoint(self) -> tuple[str, int] | None:
        """Where the server listens (in its own namespace when isolated): None until ready."""
        return ("127.0.0.1", self.port) if self.port else None

    async def connect(self) -> trio.SocketStream:
        """A new connection to the server, made by the child in its namespace and passed
        back over the control socket. OSError when it cannot be had."""
        ctrl = self._ctrl
        if ctrl is None or not self.port:
            raise OSError("the RPC server is not running")
        async with self._ctrl_lock:
            await ctrl.send(b"c")
            data, anc, _flags, _addr = await ctrl.recvmsg(256, socket.CMSG_SPACE(4))
        sock = recv_socket(data, anc)
        if sock is None:
            reason = data[1:].decode(errors="replace").strip() if data[:1] == b"e" else "no answer"
            raise OSError(f"the RPC server refused a connection: {reason}")
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    async def wait_ready(self) -> None:
        await self._ready.wait()

    @property
    def used(self) -> int:
        return self._used

    def state(self) -> RpcState:
        free = max(0, self.offered - self._used) if self.port else 0
        return RpcState(offered=self.offered, free=free, used_by=self.lender.holder_now(),
                        isolation=self.isolation)

    def describe(self) -> dict:
        return {"offered": self.offered, "free": self.state().free, "used": self._used,
                "listening": bool(self.port), "clients": self.clients, "holder": self.lender.holder_now(),
                "pid": self.pid, "restarts": self.restarts, "isolation": self.isolation}

    # ------------------------------------------------------------- supervisor
    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the server, restarting it when it dies, until cancelled. Started once it
        listens the first time (or failed to)."""
        started = False
        backoff = Backoff()
        while True:
            backoff.started()
            try:
                await self._run_once(task_status if not started else None)
            except OSError as exc:
                log.error("RPC server failed to start: %s", exc)
            if not started:
                started = True
                if not self._ready.is_set():
                    task_status.started(self)
            self.port, self.clients, self._used = None, 0, 0
            self._ready = trio.Event()
            self.on_change()
            self.restarts += 1
            log.warning("RPC server exited; restarting")
            await backoff.wait()

    async def _run_once(self, task_status) -> None:
        port = free_port()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [sys.executable, "-m", "node.rpc", "--host", "127.0.0.1", "--port", str(port),
               "--cache-dir", str(self.cache_dir), "--control-fd", str(theirs.fileno())]
        if self.isolate:
            cmd.append("--isolate")
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Buffers >= MMAP_THRESHOLD are mmap'ed, so a client's buffers go back to the OS
        # when it leaves and the resident size follows what clients hold (glibc's default
        # threshold grows after the first free and keeps freed buffers in the heap).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        try:
            proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL, env=env,
                                                    stdout=subprocess.PIPE, start_new_session=True,
                                                    pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        ctrl = trio.socket.from_stdlib_socket(ours)
        self.pid = proc.pid
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stdout, proc)
                hello = await self._wait_ready(ctrl)
                if hello is None:
                    log.error("RPC server (pid %s) did not listen on 127.0.0.1:%s", proc.pid, port)
                    nursery.cancel_scope.cancel()
                    return
                self.isolation = str(hello.get("isolation") or "none: not reported")
                self._ctrl = ctrl
                self._baseline = _rss(proc.pid)
                self.port = port
                self._ready.set()
                log.info("RPC server lending %.2f GiB (pid %s, isolation: %s)",
                         self.offered / 2**30, proc.pid, self.isolation)
                self.on_change()
                if task_status is not None:
                    task_status.started(self)
                nursery.start_soon(self._poll_memory, proc)
                await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._ctrl = None
            ctrl.close()
            with trio.CancelScope(shield=True):
                await terminate_process(proc)

    async def _wait_ready(self, ctrl) -> dict | None:
        """The child's `ready` line (node/isolation.py), or None if it never came."""
        buf = b""
        with trio.move_on_after(READY_TIMEOUT):
            while not buf.endswith(b"\n"):
                chunk = await ctrl.recv(4096)
                if not chunk:
                    return None
                buf += chunk
            try:
                hello = json.loads(buf)
            except ValueError:
                return None
            return hello if isinstance(hello, dict) and hello.get("ready") else None
        return None

    async def _read_stdout(self, proc: trio.Process) -> None:
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                if text == "Accepted client connection":
                    self.clients += 1
                elif text == "Client connection closed":
                    self.clients = max(0, self.clients - 1)
                    if self.clients == 0 and self.pid:
                        # the client's buffers are freed: what stays resident is not lent
                        self._baseline, self._used = _rss(self.pid), 0
                    self.on_change()
                log.debug("rpc server: %s", text)

    async def _poll_memory(self, proc: trio.Process) -> None:
        while True:
            used = max(0, _rss(proc.pid) - self._baseline) if self.clients else 0
            if abs(used - self._used) > CHANGE_BYTES:
                self._used = used
                self.on_change()
            else:
                self._used = used
            await trio.sleep(STATS_EVERY)


def _rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return 0

