"""`Agents`: the node's agent service: definitions, runs, schedules and their replication.

Definitions replicate to every node as API keys do (merged per name by (rev, updated,
updated_by), deletions as tombstones), but not inside gossip: each node gossips only a
digest of its records (`NodeState.extra["agents"]`) and pulls a peer's whole set over
`/mesh/records/1` (kind `agent-defs`) when that peer's digest differs from its own and
changed since the last pull from it; merging is a join, so nodes converge after one
exchange each way. The same gossip entry carries what scheduling needs: per job the wall
time from which this node takes its ticks and the state of the ticks it ran recently,
and the node's tool capabilities (its MCP servers, folders and URL prefixes), so any node
can tell which nodes can run an agent. Placement of ticks: node/agents/placement.py.

Runs are made and stored on the node that executes them (`run_<peer id>_<hex>` ids name
it): a webhook run on the node that received the request (if it can run the agent; else
a 409 naming the nodes that can), a scheduled run where placement puts it, a call from
another agent on the caller's node. Reads of another node's runs ask it over
`/mesh/records/1` (kinds `agent-runs`, `agent-run`); a run listing asks every alive node.
Following a run's steps is event-driven here and polls the holder (FOLLOW_POLL_S) for a
run on another node.

Who: an agent belongs to the API key that created it (its name, id and features are kept
in the record, never the secret); only that key and admin keys see it, its runs and
steps. Every run executes as that key, checked against this node's key ring when it
starts: a revoked key, or one without the `chat` feature its model calls need, fails the
run with that reason. On a mesh without keys there is no owner and everything is open.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Any, AsyncIterator, Callable

import trio
from pydantic import BaseModel, ConfigDict, ValidationError

from mesh.errors import BadRequest, Conflict, MeshError, NotFound, PeerError, PermissionDenied, \
    RateLimited
from mesh.records import RecordClient, make_id, owner_of
from node.agents.loop import run_loop
from node.agents.placement import SETTLE_S, Decision, Replica, decide, rank, tick_ms
from node.agents.spec import AgentRecord, AgentSpec, digest, merge, next_tick, parse_spec
from node.agents.store import TERMINAL, AgentStore
from node.agents.tools import NodeTools, ToolResult, capable, open_toolbox

__all__ = ["Agents", "KIND_DEFS", "KIND_RUNS", "KIND_RUN", "RUN_PREFIX"]

log = logging.getLogger("node.agents")

KIND_DEFS, KIND_RUNS, KIND_RUN = "agent-defs", "agent-runs", "agent-run"
RUN_PREFIX = "run_"
START_SETTLE_S = 10.0    # a node takes ticks this long after it starts: peers found and heard
TICKS_GOSSIPED = 8       # finished ticks per job in gossip (running ones: all of them)
MAX_RUNS = 16            # top-level runs at once on one node; more wait for a slot
MAX_WAITING = 64         # runs waiting for a slot; a webhook run beyond is refused (429)
MAX_DEPTH = 3            # agents calling agents calling agents...
FOLLOW_POLL_S = 0.5      # how often a run on another node is asked for new steps
RUN_LIST_MAX = 100


class _PeerAgents(BaseModel):
    """A peer's `extra["agents"]` gossip entry, checked on receipt."""
    model_config = ConfigDict(extra="ignore", frozen=True)
    v: int = 1
    digest: str = ""
    jobs: dict[str, float] = {}
    ticks: dict[str, list[tuple[int, str]]] = {}
    caps: dict[str, list[str]] = {}


def _peer_info(peer) -> _PeerAgents | None:
    raw = (peer.state.extra or {}).get("agents")
    try:
        return _PeerAgents.model_validate(raw) if isinstance(raw, dict) else None
    except ValidationError:
        return None


def _visible(owner: dict[str, Any] | None, caller: dict[str, Any] | None) -> bool:
    if owner is None or caller is None:      # ownerless, or a mesh without keys
        return True
    return caller.get("key_id") == owner.get("key_id") or "admin" in (caller.get("features") or ())


def _run_object(r: dict[str, Any], steps: int | None = None) -> dict[str, Any]:
    obj = {"id": r["id"], "object": "agent.run", "agent": r["agent"], "status": r["status"],
           "trigger": r["trigger"], "scheduled_at": r["tick"] / 1000 if r["tick"] else None,
           "parent_run": r["parent"], "input": r["input"], "output": r["output"],
           "error": r["error"], "node": r["node"], "node_id": r["node_id"], "model": r["model"],
           "usage": {"prompt_tokens": r["prompt_tokens"],
                     "completion_tokens": r["completion_tokens"],
                     "total_tokens": r["prompt_tokens"] + r["completion_tokens"]},
           "created_at": r["created_at"], "started_at": r["started_at"],
           "ended_at": r["ended_at"]}
    if steps is not None:
        obj["steps"] = steps
    return obj


def _step_object(run_id: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"object": "agent.run.step", "run_id": run_id, **s}


async def _wait_any(events: list[trio.Event], deadline: float) -> None:
    """Until one of `events` is set or trio time `deadline` passes."""
    with trio.move_on_at(deadline):
        async with trio.open_nursery() as n:
            async def one(e: trio.Event) -> None:
                await e.wait()
                n.cancel_scope.cancel()
            for e in events:
                n.start_soon(one, e)


class Agents:
    def __init__(self, store: AgentStore, *, router, keyring, node_name: str,
                 tools: NodeTools, token_cap: int = 0,
                 notify_changed: Callable[[], None] = lambda: None) -> None:
        self.store, self.router, self.keyring = store, router, keyring
        self.node_name, self.tools, self.token_cap = node_name, tools, token_cap
        self.notify_changed = notify_changed
        self.node_id = "local"
        self.p2p = None
        self.client: RecordClient | None = None
        self.records: dict[str, AgentRecord] = {r.name: r for r in store.records()}
        self._specs: dict[tuple[str, int], AgentSpec | None] = {}
        self._started = time.time()
        self._ready: dict[str, float] = {}           # job -> wall time we take its ticks from
        self._ticks: dict[str, dict[int, str]] = {
            a: dict(map(tuple, t)) for a, t in store.recent_ticks(TICKS_GOSSIPED).items()}
        self._changed = trio.Event()                 # definitions or our ticks changed
        self._live: dict[str, trio.Event] = {}       # run id -> set at its next step or end
        self._slots = trio.CapacityLimiter(MAX_RUNS)
        self._send, self._recv = trio.open_memory_channel[tuple](math.inf)
        self._gossip: dict[str, Any] = {}
        self._refresh(notify=False)

    def join(self, p2p) -> None:
        self.p2p, self.node_id, self.client = p2p, p2p.peer_id, RecordClient(p2p)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------- definitions
    def spec(self, name: str) -> AgentSpec | None:
        """The live definition called `name`, if this node's version can read it."""
        rec = self.records.get(name)
        if rec is None or rec.deleted or rec.spec is None:
            return None
        key = (name, rec.rev)
        if key not in self._specs:
            try:
                self._specs[key] = rec.agent
            except ValidationError as exc:
                log.warning("agent %s rev %d: this node cannot read its definition: %s", name,
                            rec.rev, exc.errors()[0]["msg"])
                self._specs[key] = None
        return self._specs[key]

    def why_not_here(self, spec: AgentSpec) -> str | None:
        return capable(spec, self.tools.caps(), self.spec)

    def _fold(self, records) -> bool:
        changed = merge(self.records, records)
        for name in changed:
            self.store.save(self.records[name])
        if changed:
            self._refresh()
        return bool(changed)

    def _refresh(self, notify: bool = True) -> None:
        """After a change of definitions or of our ticks: readiness, gossip, wake-ups."""
        now = time.time()
        for name in list(self.records):
            spec = self.spec(name)
            if spec is not None and spec.schedule is not None and self.why_not_here(spec) is None:
                self._ready.setdefault(name, max(now + SETTLE_S, self._started + START_SETTLE_S))
            else:
                self._ready.pop(name, None)
        self._gossip = {"v": 1, "digest": digest(self.records.values()),
                        "jobs": dict(self._ready), "caps": self.tools.caps(),
                        "ticks": {a: sorted(t.items()) for a, t in self._ticks.items()
                                  if a in self._ready}}
        self._changed.set()
        self._changed = trio.Event()
        if notify:
            self.notify_changed()

    def gossip(self) -> dict[str, Any]:
        """This node's entry of NodeState.extra (node/services.py)."""
        return {"agents": self._gossip}

    def _peers(self) -> list:
        return self.p2p.view.peers() if self.p2p is not None else []

    def runnable_on(self, spec: AgentSpec) -> list[str]:
        """The nodes (alive) that can run `spec`, by name, this one first."""
        out = [self.node_name] if self.why_not_here(spec) is None else []
        for peer in self._peers():
            info = _peer_info(peer)
            if peer.routable and info and capable(spec, info.caps, self.spec) is None:
                out.append(peer.name)
        return out

    def _owned(self, name: str, caller, *, deleted: bool = False) -> AgentRecord:
        """The agent `caller` may see (with `deleted`, a deleted one too: its runs stay
        readable); NotFound otherwise."""
        rec = self.records.get(name)
        if rec is None or (rec.deleted and not deleted) or not _visible(rec.owner, caller):
            raise NotFound(f"no agent named {name!r}", param="name", code="agent_not_found")
        return rec

    def _checked(self, spec: AgentSpec, caller) -> None:
        self.router.plan(spec.model)                  # ModelNotFound: nobody serves it
        for other in spec.tools.agents:
            rec = self.records.get(other)
            if other != spec.name and (rec is None or rec.deleted or
                                       not _visible(rec.owner, caller)):
                raise BadRequest(f"tools.agents: no agent named {other!r}",
                                 param="tools.agents")
        if not self.runnable_on(spec):
            raise BadRequest(f"no node of the mesh can run agent {spec.name!r}: "
                             f"{self.why_not_here(spec)}", param="tools",
                             code="agent_not_runnable")

    def _put(self, name: str, spec: AgentSpec | None, owner, created: float,
             rev: int) -> AgentRecord:
        rec = AgentRecord(name=name, spec=spec.model_dump() if spec else None, owner=owner,
                          created=created, rev=rev, updated=time.time(),
                          updated_by=self.node_id, deleted=spec is None)
        self._fold([rec])
        return rec

    def _agent_object(self, rec: AgentRecord) -> dict[str, Any]:
        spec = self.spec(rec.name)
        obj = {"object": "agent", "name": rec.name, "rev": rec.rev, "created_at": rec.created,
               "updated_at": rec.updated, "owner": (rec.owner or {}).get("name"),
               "definition": rec.spec, "readable": spec is not None}
        if spec is not None:
            obj["runnable_on"] = self.runnable_on(spec)
            if spec.schedule is not None:
                obj["next_runs"] = self._preview(rec, spec)
                obj["recent_ticks"] = self._seen_ticks(rec.name)
        return obj

    def _seen_ticks(self, name: str, n: int = 8) -> list[dict[str, Any]]:
        """The job's latest ticks as this node sees them in gossip: who claimed or ran each
        (what a takeover is decided from, module note of node/agents/placement.py)."""
        seen = [{"at": ms / 1000, "state": state, "node": r.name}
                for r in self._replicas(name) for ms, state in r.ticks.items()]
        return sorted(seen, key=lambda x: (x["at"], x["node"]), reverse=True)[:n]

    def _preview(self, rec: AgentRecord, spec: AgentSpec, n: int = 5) -> list[dict[str, Any]]:
        """The next ticks and the order in which nodes would take them, as of now."""
        out, t = [], time.time()
        names = {r.node_id: r.name for r in self._replicas(rec.name)}
        for _ in range(n):
            t = next_tick(spec.schedule, rec.created, t)
            ms = tick_ms(t)
            order = rank(rec.name, ms, [r.node_id for r in self._replicas(rec.name)
                                        if r.alive and r.ready_at is not None and r.ready_at <= t])
            out.append({"at": ms / 1000, "nodes": [names[i] for i in order]})
        return out

    # ----------------------------------------------------------- the API: agents
    def list(self, caller) -> list[dict[str, Any]]:
        return [self._agent_object(r) for r in sorted(self.records.values(), key=lambda r: r.name)
                if not r.deleted and _visible(r.owner, caller)]

    def get(self, name: str, caller) -> dict[str, Any]:
        return self._agent_object(self._owned(name, caller))

    def create(self, caller, data: Any) -> dict[str, Any]:
        spec = parse_spec(data)
        old = self.records.get(spec.name)
        if old is not None and not old.deleted:
            raise Conflict(f"an agent named {spec.name!r} exists; replace it with PUT "
                           f"/v1/agents/{spec.name} (mesh agents create --replace)",
                           code="agent_exists")
        self._checked(spec, caller)
        return self._agent_object(self._put(spec.name, spec, caller, time.time(),
                                            old.rev + 1 if old else 1))

    def replace(self, caller, name: str, data: Any) -> dict[str, Any]:
        spec = parse_spec(data)
        if spec.name != name:
            raise BadRequest(f"the definition is named {spec.name!r}, not {name!r}",
                             param="name")
        old = self._owned(name, caller)
        self._checked(spec, caller)
        return self._agent_object(self._put(name, spec, old.owner, old.created, old.rev + 1))

    def delete(self, caller, name: str) -> dict[str, Any]:
        old = self._owned(name, caller)
        self._put(name, None, old.owner, old.created, old.rev + 1)
        return {"object": "agent.deleted", "name": name, "deleted": True}

    # ------------------------------------------------------------- the API: runs
    async def start(self, caller, name: str, text: str) -> dict[str, Any]:
        """A run now, here (the webhook trigger): its object, status running."""
        rec = self._owned(name, caller)
        spec = self.spec(name)
        if spec is None:
            raise Conflict(f"this node cannot read agent {name!r}'s definition (a newer "
                           "version wrote it)", code="agent_unreadable")
        why = self.why_not_here(spec)
        if why:
            raise Conflict(f"node {self.node_name!r} cannot run agent {name!r}: {why}; nodes "
                           f"that can: {', '.join(self.runnable_on(spec)) or 'none'}",
                           code="agent_not_runnable_here")
        if self._slots.statistics().tasks_waiting >= MAX_WAITING:
            raise RateLimited(f"node {self.node_name!r} has {MAX_WAITING} agent runs waiting "
                              "already; try again later", code="too_many_runs")
        run_id = self._new_run(rec, spec, "webhook", text)
        self._send.send_nowait((run_id, rec, spec, text))
        return _run_object(self.store.run(run_id), 0)

    def _new_run(self, rec: AgentRecord, spec: AgentSpec, trigger: str, text: str, *,
                 tick: int | None = None, parent: str | None = None) -> str | None:
        run_id = make_id(RUN_PREFIX, self.node_id if self.p2p else None)
        ok = self.store.start(id=run_id, agent=rec.name, owner_key=(rec.owner or {}).get("key_id"),
                              trigger=trigger, tick=tick, parent=parent, input=text,
                              node=self.node_name, node_id=self.node_id, model=spec.model,
                              created_at=time.time())
        if ok:
            self._live[run_id] = trio.Event()
        return run_id if ok else None

    def _holder(self, run_id: str) -> str | None:
        owner = owner_of(RUN_PREFIX, run_id)
        return None if owner in (None, self.node_id) or self.client is None else owner

    def _local_run(self, name: str, run_id: str, caller) -> dict[str, Any] | None:
        r = self.store.run(run_id)
        if r is None or r["agent"] != name:
            return None
        rec = self.records.get(name)
        owner = rec.owner if rec else ({"key_id": r["owner_key"]} if r["owner_key"] else None)
        return r if _visible(owner, caller) else None

    async def run(self, caller, name: str, run_id: str, *, with_steps: bool = False
                  ) -> dict[str, Any]:
        """A run (and its steps), from whichever node holds it."""
        holder = self._holder(run_id)
        if holder:
            try:
                got = await self.client.get(holder, KIND_RUN, f"{name}/{run_id}", caller)
            except NotFound:
                got = None
            if got is None:
                raise NotFound(f"no run {run_id!r} of agent {name!r}", param="run_id")
            return got if with_steps else got["run"]
        got = self._held(name, run_id, caller)
        if got is None:
            raise NotFound(f"no run {run_id!r} of agent {name!r}", param="run_id")
        return got if with_steps else got["run"]

    def _held(self, name: str, run_id: str, caller) -> dict[str, Any] | None:
        """A run of this node and its steps, if `caller` may see it."""
        r = self._local_run(name, run_id, caller)
        if r is None:
            return None
        steps = self.store.steps(run_id)
        return {"run": _run_object(r, len(steps)),
                "steps": [_step_object(run_id, s) for s in steps]}

    async def runs(self, caller, name: str, limit: int) -> dict[str, Any]:
        """The agent's runs on every alive node, newest first."""
        self._owned(name, caller, deleted=True)
        found = self._local_runs(name, caller)
        unreachable: list[str] = []

        async def ask(peer) -> None:
            try:
                got = await self.client.get(peer.peer_id, KIND_RUNS, name, caller)
                found.extend(got.get("runs") or [])
            except (PeerError, NotFound) as exc:
                log.info("runs of %s on %s: %s", name, peer.name, exc.message)
                unreachable.append(peer.name)

        if self.client is not None:
            async with trio.open_nursery() as n:
                for peer in self._peers():
                    if peer.routable:
                        n.start_soon(ask, peer)
        found.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
        return {"object": "list", "data": found[:limit], "has_more": len(found) > limit,
                "unreachable": sorted(unreachable)}

    def _local_runs(self, name: str, caller) -> list[dict[str, Any]]:
        rec = self.records.get(name)
        if rec is not None and not _visible(rec.owner, caller):
            return []
        return [_run_object(r) for r in self.store.runs(name, RUN_LIST_MAX)]

    async def follow(self, caller, name: str, run_id: str) -> AsyncIterator[dict[str, Any]]:
        """The run's steps as they are recorded (those before included), then the run."""
        holder = self._holder(run_id)
        seen = 0
        while True:
            if holder:
                got = await self.run(caller, name, run_id, with_steps=True)
                run, steps = got["run"], [s for s in got["steps"] if s["n"] > seen]
                changed = None
            else:
                changed = self._live.get(run_id)
                run = await self.run(caller, name, run_id)
                steps = [_step_object(run_id, s) for s in self.store.steps(run_id, seen)]
            for s in steps:
                seen = s["n"]
                yield s
            if run["status"] in TERMINAL:
                yield run
                return
            if changed is not None:
                await changed.wait()
            elif holder:
                await trio.sleep(FOLLOW_POLL_S)
            else:                                   # running in no task here: cannot happen
                raise MeshError(f"run {run_id} is marked running but runs nowhere on this node")

    # --------------------------------------------------------------- records
    def record_sources(self) -> dict[str, Any]:
        """The `/mesh/records/1` sources of this service (node/daemon.py)."""
        me = self

        class _Defs:
            async def get(self, _id, _caller):       # definitions are mesh-wide data
                return {"records": [r.model_dump() for r in me.records.values()]}

            async def delete(self, _id, _caller):
                return False

        class _Runs:
            async def get(self, name, caller):
                return {"runs": me._local_runs(name, caller)}

            async def delete(self, _id, _caller):
                return False

        class _Run:
            async def get(self, key, caller):
                name, _, run_id = key.partition("/")
                return me._held(name, run_id, caller)

            async def delete(self, _id, _caller):
                return False

        return {KIND_DEFS: _Defs(), KIND_RUNS: _Runs(), KIND_RUN: _Run()}

    # --------------------------------------------------------------- running
    def _caller_for(self, rec: AgentRecord) -> dict[str, Any] | None:
        """The identity a run of `rec` executes as (module note: Who)."""
        if not self.keyring.enforcing:
            return None
        if not rec.owner:
            raise PermissionDenied(f"agent {rec.name!r} was made while the mesh had no API "
                                   "keys; re-create it with a key", code="agent_has_no_owner")
        live = {r.key_id: r for r in self.keyring.live()}.get(rec.owner.get("key_id"))
        if live is None:
            raise PermissionDenied(f"the API key that owns agent {rec.name!r} "
                                   f"({rec.owner.get('name')!r}) is revoked", code="owner_revoked")
        if not live.grants("chat"):
            raise PermissionDenied(f"the API key that owns agent {rec.name!r} ({live.name!r}) "
                                   "lacks the 'chat' feature its model calls need",
                                   code="feature_not_granted")
        return {"name": live.name, "key_id": live.key_id, "features": list(live.features)}

    def _step(self, run_id: str, counter: list[int], kind: str, started: float, ended: float,
              data: dict[str, Any]) -> None:
        counter[0] += 1
        self.store.step(run_id, counter[0], kind, started, ended, data)
        self._wake(run_id)

    def _wake(self, run_id: str) -> None:
        ev = self._live.get(run_id)
        if ev is not None:
            ev.set()
            self._live[run_id] = trio.Event()

    async def _execute(self, run_id: str, rec: AgentRecord, spec: AgentSpec, text: str,
                       depth: int = 0) -> tuple[str, str | None, str | None]:
        """Run the loop under the agent's deadline and record how it ended."""
        status, output, error = "failed", None, None
        counter = [0]
        try:
            caller = self._caller_for(rec)
            call_agent = partial(self._call_agent, rec, run_id, depth)
            with trio.move_on_after(spec.limits.deadline_s) as scope:
                async with open_toolbox(spec, self.tools, call_agent) as box:
                    out = await run_loop(
                        spec, text, tools=box, open_call=self.router.open, caller=caller,
                        record=partial(self._step, run_id, counter),
                        usage=partial(self.store.usage, run_id), token_cap=self.token_cap,
                        node_name=self.node_name, deadline=scope.deadline)
                status, output, error = out.status, out.output, out.error
            if scope.cancelled_caught:
                status, error = "incomplete", (f"the run's deadline ({spec.limits.deadline_s:g} s)"
                                               f" passed during step {counter[0] + 1}")
        except MeshError as exc:
            status, error = "failed", exc.message
        except trio.Cancelled:
            status, error = "interrupted", "the node stopped while this run was in progress"
            raise
        except Exception as exc:      # a bug here must fail the run, not the node
            log.exception("agent %s run %s: internal error", rec.name, run_id)
            status, error = "failed", f"internal error: {type(exc).__name__}"
        finally:
            self.store.finish(run_id, status, output, error)
            self._wake(run_id)
            self._live.pop(run_id, None)
            log.info("agent %s run %s: %s%s", rec.name, run_id, status,
                     f" ({error})" if error else "")
        return status, output, error

    async def _call_agent(self, parent_rec: AgentRecord, parent: str, depth: int, name: str,
                          text: str) -> ToolResult:
        """The `call_agent` tool: a child run here, as the parent's owner, awaited."""
        rec = self.records.get(name)
        spec = self.spec(name)
        if rec is None or spec is None or not _visible(rec.owner, parent_rec.owner):
            return ToolResult(output=f"error: no agent named {name!r}",
                              error=f"no agent named {name!r}")
        if depth + 1 >= MAX_DEPTH:
            why = f"agents may call agents only {MAX_DEPTH - 1} levels deep"
            return ToolResult(output=f"refused: {why}", error=why, refused=True)
        run_id = self._new_run(rec, spec, "agent", text, parent=parent)
        status, output, error = await self._execute(run_id, rec, spec, text, depth + 1)
        detail = {"run_id": run_id, "status": status}
        if status != "completed":
            return ToolResult(output=f"error: agent {name} {status}: {error}", error=error,
                              detail=detail)
        return ToolResult(output=output or "", detail=detail)

    # ---------------------------------------------------------------- serving
    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Runs started through the API, the schedules, and (in a mesh) replication."""
        async with trio.open_nursery() as n:
            n.start_soon(self._schedule)
            if self.p2p is not None:
                n.start_soon(self._replicate)
            task_status.started(self)
            async for run_id, rec, spec, text in self._recv:
                n.start_soon(self._execute_top, run_id, rec, spec, text)

    async def _execute_top(self, run_id, rec, spec, text) -> None:
        async with self._slots:
            await self._execute(run_id, rec, spec, text)

    async def _replicate(self) -> None:
        """Pull a peer's definitions when its digest differs from ours (module note)."""
        pulled: dict[str, str] = {}
        view = self.p2p.view
        async with trio.open_nursery() as n:
            while True:
                changed = view.changed
                mine = self._gossip["digest"]
                for peer in view.routable():
                    info = _peer_info(peer)
                    if info and info.digest not in (mine, pulled.get(peer.peer_id)):
                        pulled[peer.peer_id] = info.digest
                        n.start_soon(self._pull, peer, pulled)
                await _wait_any([changed, self._changed], float("inf"))

    async def _pull(self, peer, pulled: dict[str, str]) -> None:
        try:
            got = await self.client.get(peer.peer_id, KIND_DEFS, "all", None)
            if self._fold(got.get("records") or []):
                log.info("agent definitions merged from %s", peer.name)
        except (MeshError, ValidationError) as exc:
            log.warning("agent definitions from %s: %s", peer.name, getattr(exc, "message", exc))
            pulled.pop(peer.peer_id, None)            # try again at its next state

    # ------------------------------------------------------------- schedules
    def _replicas(self, name: str) -> list[Replica]:
        out = [Replica(self.node_id, self.node_name, True, self._ready.get(name),
                       self._ticks.get(name, {}))]
        for peer in self._peers():
            info = _peer_info(peer)
            if info is not None:
                out.append(Replica(peer.peer_id, peer.name, peer.routable, info.jobs.get(name),
                                   dict(info.ticks.get(name, ()))))
        return out

    def _job_key(self, name: str) -> tuple | None:
        """What a job's ticks depend on; None when it is not a job this node runs."""
        spec, rec = self.spec(name), self.records.get(name)
        if name not in self._ready or spec is None or spec.schedule is None:
            return None
        return (rec.created, spec.schedule.model_dump_json())

    async def _schedule(self) -> None:
        """One ticker per job this node can run; restarted when its schedule changes."""
        tickers: dict[str, tuple[tuple, trio.CancelScope]] = {}
        async with trio.open_nursery() as n:
            while True:
                changed = self._changed
                for name in list(tickers):
                    key, scope = tickers[name]
                    if self._job_key(name) != key:
                        scope.cancel()
                        del tickers[name]
                for name in list(self._ready):
                    key = self._job_key(name)
                    if key is not None and name not in tickers:
                        scope = trio.CancelScope()
                        tickers[name] = (key, scope)
                        n.start_soon(self._ticker, n, name, key, scope)
                await changed.wait()

    async def _ticker(self, nursery, name: str, key: tuple, scope: trio.CancelScope) -> None:
        """At each tick, a watcher that decides who runs it (in `nursery`, so that a
        changed schedule stops the ticker, not the ticks already under way)."""
        created, schedule = key[0], self.spec(name).schedule
        with scope:
            t = next_tick(schedule, created, time.time())
            while True:
                while (left := t - time.time()) > 0:
                    await trio.sleep(left)
                nursery.start_soon(self._watch, name, key, t)
                t = next_tick(schedule, created, t)

    async def _watch(self, name: str, key: tuple, t: float) -> None:
        ms = tick_ms(t)
        while self._job_key(name) == key:
            events = [self._changed] + ([self.p2p.view.changed] if self.p2p else [])
            d = decide(name, ms, self.node_id, self._replicas(name), time.time())
            if d.action in ("done", "skip"):
                return
            if d.action == "run":
                async with self._slots:
                    d = decide(name, ms, self.node_id, self._replicas(name), time.time())
                    if d.action == "run" and self._job_key(name) == key:
                        await self._run_tick(name, t, ms)
                        return
                continue
            await _wait_any(events, _trio_at(d))

    async def _run_tick(self, name: str, t: float, ms: int) -> None:
        rec, spec = self.records[name], self.spec(name)
        run_id = self._new_run(rec, spec, "schedule", spec.schedule.input, tick=ms)
        if run_id is None:
            return                                   # this node already ran that tick
        self._tick_state(name, ms, "running")
        log.info("agent %s: tick %.3f runs here (%s)", name, t, run_id)
        ran = False
        try:
            await self._execute(run_id, rec, spec, spec.schedule.input)
            ran = True
        finally:      # cut short (shutdown): unclaimed, so that the next node takes it over
            self._tick_state(name, ms, "done" if ran else None)

    def _tick_state(self, name: str, ms: int, state: str | None) -> None:
        ticks = self._ticks.setdefault(name, {})
        if state is None:
            ticks.pop(ms, None)
        else:
            ticks[ms] = state
        for old in [k for k in sorted(ticks) if ticks[k] == "done"][:-TICKS_GOSSIPED]:
            del ticks[old]      # a watcher sees a result within a tick or two; claims stay
        self._refresh()


def _trio_at(d: Decision) -> float:
    """A Decision's wall-clock wake-up as a trio deadline."""
    if d.wake_at is None:
        return float("inf")
    return trio.current_time() + max(0.0, d.wake_at - time.time())
