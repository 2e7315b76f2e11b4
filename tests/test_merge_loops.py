"""node/daemon.py's gossip merge loops (keys, node revocations) fold in only the states
that arrived since their last pass, not every peer's records on every view change (the
first thing bench/sim showed breaking: 148% of a core at 1,000 nodes, docs/scale.md)."""

from __future__ import annotations

from mesh.view import SUSPECT_AFTER, StateSeen, Tick, View
from mesh.wire.state import NodeState
from node.daemon import _fresh_states


def _seen(view: View, peer: str, seq: int, t: float) -> None:
    view.apply(StateSeen(peer, NodeState(node_id=peer, name=peer, seq=seq), now=t, wall=1e9 + t))


def test_a_pass_sees_each_new_state_once():
    view, last = View(), {}
    _seen(view, "p1", 1, 1.0)
    _seen(view, "p2", 1, 1.0)
    assert sorted(p.peer_id for p in _fresh_states(view, last)) == ["p1", "p2"]
    assert _fresh_states(view, last) == []                  # nothing new: nothing to merge
    _seen(view, "p2", 2, 2.0)
    assert [p.peer_id for p in _fresh_states(view, last)] == ["p2"]
    assert _fresh_states(view, last) == []
    # a lower seq the view takes (a suspect peer that restarted) is new too
    view.apply(Tick(2.0 + SUSPECT_AFTER + 0.1))
    _seen(view, "p1", 0, 2.0 + SUSPECT_AFTER + 0.2)
    assert view.get("p1").state.seq == 0
    assert [p.peer_id for p in _fresh_states(view, last)] == ["p1"]
