"""The simulator's own invariants (bench/sim) and the gossip changes it led to (issue 19).

No I/O and no clocks: the gossip rules are sans-I/O (Pacer, KeyCarry, Publisher.stamped,
mesh/view.py apply), and the simulator runs on its own virtual time.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from pydantic import ValidationError

from bench.sim.__main__ import main as sim_main
from bench.sim.sim import Scenario, Sim
from mesh.p2p import gossip
from mesh.p2p.gossip import (GOSSIP_PEERS, KEY_REPEATS, KEYS_REFRESH, MESH_RATE, MIN_INTERVAL, PERIOD_MAX,
                             PROTOCOL_ID_V11, TICK, TOPIC, KeyCarry, Pacer, Publisher, _StateRouter)
from mesh.peers import MeshPeers
from mesh.view import Connected, Disconnected, Membership, StateSeen, Tick, View, apply
from mesh.wire.state import ModelState, NodeState, _mac, open_sealed, pack, seal

KEY = b"k" * 32


# --------------------------------------------------------------------------- pacing


def test_pacer_leaves_small_meshes_as_they_were_and_bounds_large_ones() -> None:
    p = Pacer()
    for n in (1, 3, 25):
        assert p.period(n) == TICK and p.min_gap(n) == MIN_INTERVAL
    assert (p.period(100), p.min_gap(100)) == (2.0, 1.0)
    assert (p.period(1000), p.min_gap(1000)) == (20.0, 10.0)
    assert p.period(10**6) == PERIOD_MAX
    for n in (30, 100, 1000, 1500):   # n nodes all sending changes stay within the budget
        assert n / p.min_gap(n) <= MESH_RATE + 1e-9


def test_pacer_due_after_a_heartbeat_a_change_and_a_key_change() -> None:
    p = Pacer(rng=random.Random(1))
    assert p.due(10) == -math.inf                       # the first state goes out at once
    p.sent(100.0)
    assert 100.0 + TICK * (1 - gossip.HEARTBEAT_JITTER) <= p.due(10) <= 100.0 + TICK
    p.kick()
    assert p.due(10) == 100.0 + MIN_INTERVAL
    p.sent(200.0)
    p.kick()
    assert p.due(1000) == 210.0                          # a change waits for its share
    p.kick(urgent=True)
    assert p.due(1000) == 200.0 + MIN_INTERVAL           # a key ring change does not
    p.sent(300.0)
    assert not p.kicked and not p.urgent


def test_key_ring_is_carried_on_change_to_a_new_peer_and_on_refresh() -> None:
    kc = KeyCarry()
    ring = [{"key_id": "a", "rev": 1}]
    took = [kc.take(ring, t, peers=2) for t in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)]
    assert took == [True] * KEY_REPEATS + [False] * (6 - KEY_REPEATS)
    assert kc.take(ring, 1.0, peers=3) and not kc.take(ring, 1.1, peers=3)   # a peer joined
    assert not kc.take(ring, 1.0 + KEYS_REFRESH - 0.1, peers=3)
    assert kc.take(ring, 1.0 + KEYS_REFRESH, peers=3)                       # refresh
    assert not kc.changed(ring) and kc.changed([{"key_id": "a", "rev": 2}])
    assert kc.take([{"key_id": "a", "rev": 2}], 40.0, peers=2)               # fewer peers: no trigger


def test_publisher_stamps_its_period_and_leaves_an_unchanged_ring_out() -> None:
    ring = [{"key_id": "a", "rev": 1}]
    pub = Publisher(None, hmac_key=KEY, state=lambda: NodeState(name="a", keys=list(ring)), node_id="me",
                    addrs=lambda: ["/ip4/10.0.0.1/tcp/1/p2p/me"], mesh_size=lambda: 100)
    states = [pub.stamped(float(t)) for t in range(KEY_REPEATS + 2)]
    assert [bool(s.keys) for s in states] == [True] * KEY_REPEATS + [False, False]
    assert all(s.period == 2.0 and s.node_id == "me" for s in states)
    assert [s.seq for s in states] == sorted({s.seq for s in states})
    assert open_sealed(seal(states[0], KEY), KEY).period == 2.0
    pub.pacer.sent(10.0)
    pub.kicked()
    assert pub.pacer.due(100) == 11.0                    # an ordinary change: min_gap(100)
    ring.append({"key_id": "b", "rev": 1})
    pub.kicked()
    assert pub.pacer.due(100) == 10.0 + MIN_INTERVAL     # the ring changed: urgent


# --------------------------------------------------------------------------- wire and view


def test_a_state_without_period_reads_as_one_second_and_bad_periods_are_refused() -> None:
    fields = NodeState(node_id="p", seq=1).model_dump()
    del fields["period"]                      # what a node from before issue 19 sends
    body = pack(fields)
    assert open_sealed(pack([1, 1, body, _mac(KEY, 1, 1, body)]), KEY).period == 1.0
    for bad in (0, -1.0, 1e9):
        with pytest.raises(ValidationError):
            NodeState(period=bad)


def test_view_suspects_a_paced_peer_after_three_of_its_periods() -> None:
    m = apply(Membership(), StateSeen("p", NodeState(node_id="p", seq=1, period=10.0), now=0.0, wall=0.0))
    assert apply(m, Tick(29.9)) is m
    assert apply(m, Tick(30.1)).peers["p"].status == "suspect"
    assert "p" in apply(m, Tick(99.0)).peers and "p" not in apply(m, Tick(100.1)).peers
    old = apply(Membership(), StateSeen("q", NodeState(node_id="q", seq=1), now=0.0, wall=0.0))
    assert apply(old, Tick(3.1)).peers["q"].status == "suspect"    # 1 s period: the 3 s rule


def test_mesh_peers_candidates_follow_every_new_state() -> None:
    view = View()

    def seen(seq: int, busy: int) -> None:
        view.apply(StateSeen("p", NodeState(node_id="p", name="p", seq=seq, models=[
            ModelState(id="m", slots=2, busy=busy, aliases=["alias"])]), float(seq), 0.0))

    seen(1, 0)
    peers = MeshPeers(view)
    assert [c.busy for c in peers.candidates("m")] == [0]
    assert [c.model for c in peers.candidates("alias")] == ["m"] and peers.candidates("other") == []
    seen(2, 2)
    assert [c.busy for c in peers.candidates("m")] == [2]          # not the candidate made before
    view.apply(Connected("p"))
    view.apply(Disconnected("p"))             # its last connection closed: suspect
    assert peers.candidates("m") == []
    for i in range(200):     # peers come and go: what is kept stays bounded by the view
        view.apply(StateSeen(f"x{i}", NodeState(node_id=f"x{i}", seq=1), 0.0, 0.0))
        peers.candidates("m")
        assert len(peers._made) <= len(view) + 64
        if i % 50 == 49:
            view.apply(Tick(1e6 + i))         # unheard for ages and not connected: dropped


# --------------------------------------------------------------------------- gossipsub router


def _router(cls: type) -> GossipSub:
    return cls(protocols=[PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
               adaptive_gossip_enabled=False)


def test_ihave_goes_to_a_few_peers_not_a_quarter_of_the_mesh() -> None:
    assert _router(GossipSub)._get_adaptive_gossip_peers_count(TOPIC, 990) == 247   # py-libp2p's own
    ours = _router(_StateRouter)
    assert ours._get_adaptive_gossip_peers_count(TOPIC, 990) == GOSSIP_PEERS
    assert ours._get_adaptive_gossip_peers_count(TOPIC, 3) == 3


def test_a_new_peer_gets_only_our_own_latest_message(monkeypatch) -> None:
    me, other, newcomer = ID(b"\x00me"), ID(b"\x00other"), ID(b"\x00new")

    class OnePubsub:       # the attributes of py-libp2p's Pubsub the replay reads
        my_id = me
        peers = {newcomer: object()}
        host = None

    r = _router(_StateRouter)
    r.pubsub = OnePubsub()
    sent: list[tuple[ID, rpc_pb2.RPC]] = []
    monkeypatch.setattr(gossip, "env_to_send_in_RPC", lambda host: (b"record", False))
    monkeypatch.setattr(r, "send_rpc", lambda peer, rpc, priority=False: sent.append((peer, rpc)))
    for i, frm in enumerate([me, other, me, other]):
        r.mcache.put(rpc_pb2.Message(from_id=frm.to_bytes(), seqno=i.to_bytes(8, "big"), topicIDs=[TOPIC],
                                     data=b"%d" % i))
    trio.run(r.send_recent_messages, newcomer, TOPIC)
    assert [(p, [m.data for m in rpc.publish], rpc.senderRecord) for p, rpc in sent] == [(newcomer, [b"2"], b"record")]


# --------------------------------------------------------------------------- simulator


def _sim(**kw) -> Sim:
    base = dict(nodes=30, seconds=10.0, warmup=4.0, churn=0.0, loss=0.0, load=0.3, seed=7)
    return Sim(Scenario(**{**base, **kw}))


@pytest.mark.parametrize("design", ["v1", "current"])
def test_every_message_reaches_every_node_exactly_once(design: str) -> None:
    sim = _sim(design=design)
    sim.delivered_pairs = set()          # Sim.delivered fails on a second delivery of a pair
    sim.gossip.kept = []
    try:
        sim.start()
        sim.advance(sim.sc.warmup + sim.sc.seconds)
    finally:
        sim.close()
    end = sim.loop.now
    settled = [m for m in sim.gossip.kept if m.t < end - 1.0]
    assert len(settled) > 100
    everyone = set(range(sim.sc.nodes))
    got = Counter(m_id for _, m_id in sim.delivered_pairs)
    for m in settled:
        assert got[m.id] == len(everyone) - 1, (m.id, m.origin, got[m.id])
        assert m.got == len(everyone) and sum(m.have) == len(everyone)


def test_loss_and_churn_never_deliver_a_message_twice() -> None:
    sim = _sim(loss=0.05, churn=3.0, max_down=0.1, seconds=20.0)
    sim.delivered_pairs = set()
    try:
        sim.start()
        sim.advance(sim.sc.warmup + sim.sc.seconds)
    finally:
        sim.close()
    assert sim.links.late > 0 and len(sim.churn_log) > 5       # both were exercised
    assert len(sim.delivered_pairs) == sim.deliveries


def test_churn_stays_within_its_bound() -> None:
    sc = Scenario(nodes=40, seconds=40.0, warmup=4.0, churn=3.0, max_down=0.1, load=0.3, seed=3)
    sim = Sim(sc)
    sim.run()
    kinds = Counter(kind for _, kind, _, _ in sim.churn_log)
    bound = int(sc.max_down * sc.nodes)
    assert kinds["leave"] + kinds["freeze"] >= 2 * bound                # the bound was pressed
    assert max(down for *_, down in sim.churn_log) <= bound
    assert sim.n_up >= sc.nodes - bound and sim.n_up <= sc.nodes
    assert kinds["leave"] - kinds["join"] <= bound and kinds["freeze"] - kinds["thaw"] <= bound
    assert sim.true_suspicions > 0                                       # frozen nodes were seen


def test_same_seed_same_figures() -> None:
    a = _sim(churn=1.0, seconds=8.0).run()
    b = _sim(churn=1.0, seconds=8.0).run()
    assert a == b


def test_a_joiner_gets_our_latest_states_not_everyones_cache() -> None:
    copies = {}
    for design in ("v1", "current"):
        sim = _sim(nodes=60, design=design)
        try:
            sim.start()
            sim.advance(8.0)
            j = sim.join_now()
            copies[design] = sim.gossip.traffic.msgs_in[j]
            sim.advance(12.0)
            assert sim.nodes[j].view is not None and len(sim.nodes[j].view) == 60
        finally:
            sim.close()
    assert copies["current"] <= 60            # one state from each member
    assert copies["v1"] > 20 * 60             # each member's last 3 s of the whole mesh


def test_the_cli_prints_a_row_per_design(capsys) -> None:
    sim_main(["--nodes", "12", "--seconds", "4", "--warmup", "3", "--churn", "0"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| v1 ") or line.startswith("| current ")]
    assert len(rows) == 2 and "12 nodes" in out
