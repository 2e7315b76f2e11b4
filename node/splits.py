"""Split models: a model spread over this node and peers that lend memory (llama.cpp RPC).

`Splits.serve` owns one task per split model (commands arrive over a channel, so no
nursery is stored). A model's task loops:

  1. place it (node/placement.py) from the gossiped `rpc` state of the alive peers, a
     probe of the tunnel path to each (round trip and MB/s, mesh/tunnel.py `probe`) and
     whether it gossips the model file's sha256, excluding peers that just failed; a
     model that fits here is refused with the reason unless the split is forced;
  2. open one tunnel per chosen peer (mesh/tunnel.py: a 127.0.0.1 listener whose
     connections are carried over `/mesh/rpc/2`, on the bulk side channel); a peer with
     its own copy of the file gets the tensor table, so it fills its weights from disk;
  3. start the model's worker (node/workers.py) with `rpc_servers` = the tunnels' local
     ends and `rpc_layers` = the layers per peer; the worker registers them with
     llama.cpp and keeps the output layer and token embeddings here (node/rpc.py);
  4. watch: a tunnel that breaks (a stream reset, a peer that closes the RPC connection)
     or a peer that stops gossiping (suspect) is a failure; the model was unloaded by
     the user: the task ends and the tunnels close.

Failure: the worker is failed at once with the reason (`Worker.fail`: in-flight requests
end with it, the process is stopped; llama.cpp's RPC client would abort it anyway), the
tunnels are closed, and the model is placed again on the nodes left (the failed peer is
left out for EXCLUDE_FOR seconds). If it cannot be placed, the model stays `failed` in
the status with both reasons. The reason is also kept in the new split's `failure`.
Nothing waits without a deadline: loads are bounded by node/workers.py's LOAD_TIMEOUT,
and a peer that hangs without closing its connection is caught by gossip liveness.

The status of a split model (its worker's `describe()`) carries `split`: the nodes in
layer order (this node first), their layer counts, tensor_split fractions, estimated
bytes, the tunnels' byte counters and the last failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

import trio

from mesh.errors import BadRequest, Conflict, MeshError, NoCapacity, Unavailable
from mesh.tunnel import LinkProbe, ModelFile, TunnelStats, probe, serve_tunnel
from node import resources
from node.placement import (DEFAULT_CONTEXT, CannotFit, PeerOffer, Placement, Pointless, alone, eligible,
                            model_info, place, slots, tensor_table)
from node.workers import ModelSpec, Worker, WorkerPool

log = logging.getLogger("node.splits")

EXCLUDE_FOR = 30.0         # s a peer that failed is left out of placements
WATCH_EVERY = 1.0          # s between liveness checks when nothing else wakes the watcher
MAX_REPLACEMENTS = 3       # re-placements in a row before the model is left failed
STABLE_AFTER = 60.0        # s of serving after which a failure starts a new row
PROBE_TIMEOUT = 5.0        # s for the link probes before a placement (peers not done: RTT only)


@dataclass
class _Request:
    installed: Any
    reply: trio.MemorySendChannel
    force: bool = False


@dataclass
class _Split:
    model_id: str
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    worker: Worker | None = None
    info: dict[str, Any] = field(default_factory=dict)
    loaded_at: float | None = None     # monotonic time the current placement loaded


class Splits:
    """The split models this node loads."""

    def __init__(self, *, pool: WorkerPool, p2p, threads: int = 0, memory_limit: int = 0,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.pool = pool
        self.p2p = p2p
        self.threads = threads
        self.memory_limit = memory_limit   # the most RAM placement counts as this node's
        self.stopping = stopping      # the node is shutting down: links break, do not re-place
        self._splits: dict[str, _Split] = {}
        self._slots: dict[str, int] = {}   # model id -> the slots its placement counted
        self._send, self._recv = trio.open_memory_channel(64)

    # ------------------------------------------------------------------ API
    async def load(self, installed, *, force: bool = False) -> Worker:
        """Place, load and keep a split model; returns its worker once loaded. Raises
        NoCapacity when it cannot be placed, BadRequest when it fails to load or fits here
        (a split would only be slower) and `force` is not set."""
        if installed.backend != "llama":
            raise BadRequest(f"model {installed.id!r} ({installed.backend}) cannot be split: "
                             "only llama.cpp models can", param="split", code="split_unsupported")
        w = self.pool.get(installed.id)
        if w is not None and w.state in ("loading", "loaded"):
            if not w.spec.config.get("split"):
                raise Conflict(f"model {installed.id!r} is loaded here unsplit; unload it first "
                               f"(mesh unload {installed.id})", code="model_loaded")
            if w.state == "loaded":
                return w
        reply_send, reply_recv = trio.open_memory_channel(1)
        await self._send.send(_Request(installed, reply_send, force))
        result = await reply_recv.receive()
        if isinstance(result, Exception):
            raise result
        return result

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            async for req in self._recv:
                old = self._splits.pop(req.installed.id, None)
                if old is not None:
                    old.cancel.cancel()
                s = _Split(req.installed.id)
                self._splits[s.model_id] = s
                nursery.start_soon(self._run, s, req)

    # ------------------------------------------------------------- internals
    async def _offers(self, sha256: str | None, exclude: frozenset[str]) -> list[PeerOffer]:
        """Every peer as placement sees it; eligible ones with a fresh link probe."""
        out = []
        for p in self.p2p.view.peers():
            rpc = p.state.rpc
            out.append(PeerOffer(peer_id=p.peer_id, name=p.name, offered=rpc.offered,
                                 free=rpc.free, used_by=rpc.used_by,
                                 alive=p.routable and p.connected, rtt_ms=p.rtt_ms,
                                 has_file=_gossips(p, sha256)))
        probes: dict[str, LinkProbe] = {}

        async def one(peer_id: str) -> None:
            try:
                probes[peer_id] = await probe(self.p2p, peer_id)
            except MeshError as exc:
                log.info("link probe of %s failed: %s", peer_id[-8:], exc.message)
        with trio.move_on_after(PROBE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for o in eligible(out, self.p2p.peer_id, exclude):
                    nursery.start_soon(one, o.peer_id)
        return [replace(o, rtt_ms=probes[o.peer_id].rtt_ms, mbps=probes[o.peer_id].mbps)
                if o.peer_id in probes else o for o in out]

    async def _place(self, installed, exclude: frozenset[str], force: bool, *,
                     alone_ok: bool = False) -> Placement:
        """A placement; after a failure (`alone_ok`) a model that fits here loads here."""
        info = await trio.to_thread.run_sync(model_info, str(installed.path))
        cfg = installed.config or {}
        n = self._slots[installed.id] = slots(cfg, info, resources.read().ram_free)
        n_ctx = int(cfg.get("context_size") or DEFAULT_CONTEXT) * n
        peers = await self._offers(_sha256(installed), exclude)
        kw = dict(n_ctx=n_ctx, local_free=resources.read().ram_free, peers=peers, split=True,
                  me=self.p2p.peer_id, my_name=self.p2p.name, exclude=exclude,
                  local_limit=self.memory_limit)
        try:
            placement = place(info, **kw, force=force)
        except Pointless:
            if not alone_ok:
                raise
            placement = alone(info, n_ctx=n_ctx, my_name=self.p2p.name)
        log.info("placing %s: %s", installed.id, "; ".join(
            f"{o.name}: {o.free / 2**20:.0f} MiB free, rtt {o.rtt_ms or 0:.2f} ms, "
            f"{o.mbps or 0:.0f} MB/s{', has the file' if o.has_file else ''}"
            for o in peers if o.offered) or "no lenders")
        return placement

    def _spec(self, installed, placement: Placement, ports: list[int], info: dict) -> ModelSpec:
        config = dict(installed.config or {})
        config.update(parallel=self._slots.get(installed.id, config.get("parallel")),  # as placed
                      rpc_servers=[f"127.0.0.1:{p}" for p in ports],
                      rpc_layers=[s.layers for s in placement.peers],
                      embeddings=False,   # a second llama context would hold the layers twice
                      split=info)
        if self.threads:
            config["threads"] = self.threads
        return ModelSpec(id=installed.id, backend=installed.backend, path=str(installed.path),
                         config=config, aliases=list(installed.aliases))

    async def _run(self, s: _Split, req: _Request) -> None:
        installed = req.installed
        reply: trio.MemorySendChannel | None = req.reply
        excluded: dict[str, float] = {}
        failure: str | None = None
        attempts = 0

        def answer(result) -> None:
            nonlocal reply
            if reply is not None:
                reply.send_nowait(result)
                reply = None

        with s.cancel:
            try:
                while True:
                    now = time.monotonic()
                    exclude = frozenset(p for p, until in excluded.items() if until > now)
                    try:
                        placement = await self._place(installed, exclude, req.force,
                                                      alone_ok=failure is not None)
                    except Pointless as exc:
                        answer(BadRequest(f"not splitting {installed.id!r}: {exc}",
                                          param="split", code="split_pointless"))
                        self._splits.pop(s.model_id, None)
                        return
                    except (CannotFit, OSError, ValueError, KeyError) as exc:
                        msg = f"cannot place {installed.id!r}: {exc}"
                        self._give_up(s, f"{failure}; {msg}" if failure else msg)
                        answer(NoCapacity(msg, code="split_cannot_fit"))
                        return
                    if not placement.split and failure is None:
                        answer(NoCapacity(
                            f"no peer lends memory to split {installed.id!r} over (start peers "
                            "with --offer-memory), or load it without split", code="split_no_peers"))
                        self._splits.pop(s.model_id, None)
                        return
                    broken = await self._serve_once(s, installed, placement, failure, answer)
                    if broken is None:
                        return                   # unloaded, or failed without a peer to blame
                    peer_id, failure = broken
                    if self.stopping():
                        return
                    if peer_id:
                        excluded[peer_id] = time.monotonic() + EXCLUDE_FOR
                    if s.loaded_at is not None and time.monotonic() - s.loaded_at > STABLE_AFTER:
                        attempts = 0             # it had been serving: a new run of failures
                    attempts += 1
                    if attempts > MAX_REPLACEMENTS:
                        self._give_up(s, f"{failure}; gave up after {MAX_REPLACEMENTS} re-placements")
                        answer(Unavailable(failure, code="split_failed"))
                        return
                    log.warning("split model %s: %s; placing it again", installed.id, failure)
            finally:
                answer(Unavailable(f"the split load of {installed.id!r} was cancelled"))
                if self._splits.get(s.model_id) is s and (s.worker is None or s.worker.state != "failed"):
                    self._splits.pop(s.model_id, None)

    def _give_up(self, s: _Split, reason: str) -> None:
        log.error("split model %s: %s", s.model_id, reason)
        s.info = {**s.info, "failure": reason}
        w = s.worker
        if w is not None and self.pool.get(s.model_id) is w:
            w.error = reason
            if w.state != "failed":
                w.fail(reason)
            w.spec.config["split"] = s.info
            w.on_change()

    async def _serve_once(self, s: _Split, installed, placement: Placement,
                          failure: str | None, answer) -> tuple[str, str] | None:
        """Run one placement until it breaks: (peer id, reason). None when the model was
        unloaded (or failed to load for a reason no peer explains)."""
        broken: list[tuple[str, str]] = []
        wake = trio.Event()
        names = {p.peer_id: p.name for p in placement.peers}

        def on_broken(peer_id: str, reason: str) -> None:
            if broken:
                return
            reason = f"peer {names.get(peer_id, peer_id[-8:])!r} holding part of " \
                     f"{installed.id!r} went away: {reason}"
            broken.append((peer_id, reason))
            w = s.worker
            if w is not None and self.pool.get(s.model_id) is w and w.state != "stopped":
                w.fail(reason)   # before the worker aborts: its requests get this reason
            wake.set()

        s.loaded_at = None
        stats = {p.peer_id: TunnelStats() for p in placement.peers}
        info = {**placement.describe(), "peers": [p.peer_id for p in placement.peers],
                "failure": failure, "tunnels": {names[k]: vars(v) for k, v in stats.items()}}
        s.info = info
        sha = _sha256(installed)
        holders = {p.peer_id for p in placement.peers if _gossips(self.p2p.view.get(p.peer_id), sha)}
        model = None
        if holders:
            table = await trio.to_thread.run_sync(tensor_table, str(installed.path))
            model = ModelFile(sha256=sha, path=str(installed.path), tensors=table)
        async with trio.open_nursery() as tunnels:
            ports = []
            for p in placement.peers:
                ports.append(await tunnels.start(partial(
                    serve_tunnel, self.p2p, p.peer_id, on_broken=partial(on_broken, p.peer_id),
                    stats=stats[p.peer_id], model=model if p.peer_id in holders else None)))
            spec = self._spec(installed, placement, ports, info)
            log.info("split model %s over %s (layers %s)", installed.id,
                     ", ".join(info["nodes"]), info["layers"])
            w = await self.pool.load(spec, wait=False)
            s.worker = w
            try:
                result = await self._watch(s, w, placement, on_broken, wake, broken, answer)
            finally:
                tunnels.cancel_scope.cancel()
        return result

    async def _watch(self, s: _Split, w: Worker, placement: Placement, on_broken, wake,
                     broken, answer) -> tuple[str, str] | None:
        loaded_once = False
        while True:
            if broken:
                return broken[0]
            if self.pool.get(s.model_id) is not w or w.state == "stopped":
                return None                          # unloaded
            if w.state == "loaded" and not loaded_once:
                loaded_once = True
                s.loaded_at = time.monotonic()
                answer(w)
            if w.state == "failed":
                # failed to load, and no tunnel said why
                msg = f"model {s.model_id!r} failed to load split: {w.error}"
                answer(BadRequest(msg, code="model_load_failed"))
                return None
            for p in placement.peers:
                peer = self.p2p.view.get(p.peer_id)
                if peer is None or not peer.routable:
                    on_broken(p.peer_id, "it stopped answering (no gossip for "
                                         "3 s, or its connection closed)")
            if broken:
                continue
            view_changed = self.p2p.view.changed
            with trio.move_on_after(WATCH_EVERY if w.state == "loaded" else 0.2):
                async with trio.open_nursery() as n:
                    async def wait(ev, scope=n.cancel_scope):
                        await ev.wait()
                        scope.cancel()
                    n.start_soon(wait, wake)
                    n.start_soon(wait, view_changed)


def _sha256(installed) -> str | None:
    """The pinned sha256 of the model's GGUF (what peers gossip when they hold it)."""
    for f in installed.files:
        if installed.dir / f.path == installed.path:
            return f.sha256
    return None


def _gossips(peer, sha256: str | None) -> bool:
    files = peer.state.extra.get("files") if peer is not None else None
    return bool(sha256) and isinstance(files, list) and sha256 in files


__all__ = ["Splits", "EXCLUDE_FOR", "MAX_REPLACEMENTS"]
