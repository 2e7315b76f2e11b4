"""Who runs a scheduled tick, with no leader: rendezvous hashing over the nodes that can.

Design notes
------------
Every node holds every agent definition (replicated by revision, node/agents/service.py)
and computes the same tick instants for a job (node/agents/spec.py `next_tick`: interval
ticks are anchored at the agent's creation time, cron ticks are UTC instants). Each node
gossips, in `NodeState.extra["agents"]`, for every scheduled agent it can run (it has the
agent's MCP servers, folders and URL prefixes) the wall time from which it takes that
job's ticks (`ready_at`), and the state of the job's recent ticks it ran: `running`
(claimed) or `done`.

For tick t of job J, the candidates are the nodes whose `ready_at` <= t, ranked by
rendezvous (highest-random-weight) hashing: score = sha256(J, t, node id), highest first.
Every node that can run J decides, from its own view of the mesh (`decide`, pure):

1. some node (alive or not) reports t `done`     -> done, nothing to do;
2. some other alive node reports t `running`     -> wait (watch it);
3. I am the first *alive* candidate              -> run it: claim (a row in my runs table,
   `running` in my gossip at once), execute, then `done`;
4. otherwise                                     -> wait for the nodes ranked above me, and
   decide again whenever the view changes (a state arrives, a node turns suspect) or at
   t + p * CLAIM_WAIT_S (p: my position among the alive candidates), when I run it if
   no alive node has claimed it by then.

So the first node runs the tick; when it is gone (kill -9: its connections drop and its
peers mark it suspect at once; a silent node is suspect after mesh/view.py SUSPECT_AFTER,
3 s), the next alive one in rank takes it over, from the start if the first died
mid-run. Hashing per (job, tick) spreads a job's ticks over the nodes that can run it;
nodes agree on the ranking without talking because they agree on the inputs.

The guarantee, precisely:
- No tick lost: every tick of J whose instant passes while at least one node that can
  run J is up and settled is completed by one of them. A tick whose runner is gone
  before its peers heard it `done` is run again, in full, by the next node: one that
  died mid-run (its steps are recorded there as `interrupted` when it restarts), and
  one that died in the instant between the end of the run and the gossip message that
  says so (sent at once, mesh/p2p/gossip.py: at most 4 a second).
- None run twice, as long as failure detection is accurate: a second node starts tick t
  only when every node above it is seen gone (suspect or dropped) or has not claimed t
  within p * CLAIM_WAIT_S, and a node that reaches step 3 late sees the earlier claim
  (rule 2) and does not run it. One node never runs the same tick twice (its runs table
  keys a tick once). Two nodes can run the same tick only when the view lies: a node
  that is alive but unheard for SUSPECT_AFTER (frozen, partitioned) while it runs t, a
  claim that takes longer than CLAIM_WAIT_S to reach a peer, or replicas that disagree on
  the definition for the few seconds an edit takes to replicate (a changed schedule or
  tool set). A run that was executing on a node that died may have made its tool calls
  already: the takeover repeats them (at-least-once side effects).
- Settling: a node takes ticks only SETTLE_S after it started and after it began
  advertising the job (its `ready_at`), so every peer has its state, and its peers'
  claims, before it decides; peers count it from that same instant. A node that cannot
  reach its peers within that time (a partition at start) decides alone.
- Ticks that pass while no node that can run the job is up are skipped, not caught up
  (as cron); a deleted or changed job's pending ticks are dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

__all__ = ["CLAIM_WAIT_S", "SETTLE_S", "Replica", "Decision", "rank", "decide", "tick_ms"]

# How long a node waits, per position in the ranking, for the nodes ranked above it to
# claim a tick before it runs it: well above a gossip round (<= 1 s) and a node's start.
CLAIM_WAIT_S = 10.0
# A node takes a job's ticks this long after it starts and after it begins advertising
# the job: three gossip rounds (mesh/p2p/gossip.py, 1 s), so its peers have heard it.
SETTLE_S = 3.0


def tick_ms(t: float) -> int:
    """A tick's identity on the wire: its instant in whole milliseconds."""
    return int(round(t * 1000))


@dataclass(frozen=True)
class Replica:
    """One node as this node sees it, for one job."""
    node_id: str
    name: str
    alive: bool
    ready_at: float | None                       # None: it does not run this job
    ticks: Mapping[int, str] = field(default_factory=dict)   # tick ms -> running | done


@dataclass(frozen=True)
class Decision:
    action: Literal["run", "wait", "done", "skip"]
    by: str | None = None          # who ran it, runs it, or is waited for
    wake_at: float | None = None   # wall time to decide again if nothing changes before


def _score(job: str, tick: int, node_id: str) -> bytes:
    return hashlib.sha256(f"{job}\n{tick}\n{node_id}".encode()).digest()


def rank(job: str, tick: int, node_ids: Iterable[str]) -> list[str]:
    """Rendezvous order of `node_ids` for (job, tick), first = runs it."""
    return sorted(node_ids, key=lambda n: _score(job, tick, n), reverse=True)


def decide(job: str, tick: int, me: str, replicas: Iterable[Replica], now: float) -> Decision:
    """What node `me` does about tick `tick` (ms) of `job` now (module note, rules 1-4)."""
    nodes = {r.node_id: r for r in replicas}
    for r in nodes.values():
        if r.ticks.get(tick) == "done":
            return Decision("done", by=r.name)
    for r in nodes.values():
        if r.node_id != me and r.alive and r.ticks.get(tick) == "running":
            return Decision("wait", by=r.name)
    at = tick / 1000
    order = rank(job, tick, [r.node_id for r in nodes.values()
                             if r.ready_at is not None and r.ready_at <= at])
    alive = [n for n in order if nodes[n].alive or n == me]
    if me not in alive:
        return Decision("skip")
    pos = alive.index(me)
    if pos == 0:
        return Decision("run", by=nodes[me].name)
    wake = at + pos * CLAIM_WAIT_S
    if now >= wake:
        return Decision("run", by=nodes[me].name)
    return Decision("wait", by=nodes[alive[0]].name, wake_at=wake)
