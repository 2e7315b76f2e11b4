"""What one gossip message costs, measured on this machine with the real code.

The simulator charges each virtual node CPU time per operation (bench/sim/gossipsub.py);
these are those prices, timed here with py-libp2p's own objects and ours, never guessed:

    parse      rpc_pb2.RPC.ParseFromString of one forwarded state message
    envelope   maybe_consume_signed_record: py-libp2p verifies the signed peer record
               that it attaches to EVERY pubsub RPC (data, IHAVE, GRAFT: Ed25519 each)
    verify     signature_validator: the message's own Ed25519 signature (first copy only)
    seen       LastSeenCache lookup of a message id
    serialize  RPC.SerializeToString (per copy sent)
    sign       the publisher's Ed25519 signature
    seal/open  mesh/wire/state.py seal and open_sealed (the validator and the subscriber
               each open a first copy: two opens)
    apply      mesh/view.py apply(StateSeen) on a membership of n peers: a + b*n
    merge      mesh/keys.py KeyRing.merge of a ring it already holds, per record
    ihave_id   one id of a received IHAVE: hex decode + seen lookup
    e2e        two real nodes (open_p2p) on 127.0.0.1: process CPU per state published by A
               and delivered to B's view, everything included (Noise, yamux, trio, tasks)

``residual = e2e - (sign + serialize + parse + envelope + seen + verify + 2 open + apply)``
is the stream machinery (Noise, yamux, task spawns) the pieces above do not cover; the
model splits it evenly between the sending and the receiving side of a copy.

    .venv/bin/python -m bench.sim.calibrate        # writes bench/sim/calibration.json

Each micro figure is the fastest of 3 rounds (the machine is shared), e2e the fastest of 2.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import trio

HERE = Path(__file__).resolve().parent
OUT = HERE / "calibration.json"


def _best(fn: Callable[[], Any], n: int = 2000, rounds: int = 3) -> float:
    """Seconds per call, the fastest of ``rounds``."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


async def _measure(tmp: Path) -> dict[str, Any]:
    from libp2p.peer.peerstore import env_to_send_in_RPC
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.utils import maybe_consume_signed_record, safe_bytes_from_hex
    from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX, signature_validator

    from bench.sim.node import sample_keyring, typical_state
    from mesh.p2p import open_p2p
    from mesh.p2p.gossip import TOPIC
    from mesh.token import new_token, parse_token
    from mesh.view import Membership, StateSeen, apply
    from mesh.wire.state import open_sealed, seal

    token = parse_token(new_token())
    key = token.keys.hmac_key
    ring = sample_keyring(tmp / "ring", 5)
    base = typical_state("a", keys=ring.wire())
    async with open_p2p(home=tmp / "a", token=token, name="a", listen_host="127.0.0.1", p2p_port=0,
                        peers=[], mdns=False, state=lambda: base) as a:
        async with open_p2p(home=tmp / "b", token=token, name="b", listen_host="127.0.0.1",
                            p2p_port=0, peers=[a.addrs[0]], mdns=False, state=lambda: base) as b:
            assert await b.view.wait_for(lambda v: a.peer_id in v, 20), "b never heard a"
            assert await a.view.wait_for(lambda v: b.peer_id in v, 20), "a never heard b"
            ps_a, ps_b = a._publisher._pubsub, b._publisher._pubsub
            host_a, host_b = a._host, b._host
            st = base.model_copy(update={"node_id": a.peer_id, "addrs": a.addrs, "seq": 1, "ts": time.time()})
            data = seal(st, key)
            msg = rpc_pb2.Message(data=data, topicIDs=[TOPIC], from_id=host_a.get_id().to_bytes(),
                                  seqno=(1).to_bytes(8, "big"))
            payload = PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
            msg.signature = ps_a.sign_key.sign(payload)
            msg.key = host_a.get_public_key().serialize()
            rpc = rpc_pb2.RPC(publish=[msg])
            rpc.senderRecord = env_to_send_in_RPC(host_a)[0]
            raw = rpc.SerializeToString()
            mid = msg.from_id + msg.seqno
            ihave = rpc_pb2.RPC(control=rpc_pb2.ControlMessage(ihave=[rpc_pb2.ControlIHave(
                topicID=TOPIC, messageIDs=[mid] * 100)]))
            ihave.senderRecord = rpc.senderRecord
            ps_b.seen_messages.add(mid)
            a_id = host_a.get_id()

            def parse() -> None:
                rpc_pb2.RPC().ParseFromString(raw)

            costs = {
                "sign": _best(lambda: ps_a.sign_key.sign(payload), 500),
                "serialize": _best(rpc.SerializeToString),
                "parse": _best(parse),
                "envelope": _best(lambda: maybe_consume_signed_record(rpc, host_b, a_id), 500),
                "verify": _best(lambda: signature_validator(msg), 500),
                "seen": _best(lambda: ps_b.seen_messages.has(mid)),
                "seal": _best(lambda: seal(st, key)),
                "open": _best(lambda: open_sealed(data, key)),
                "ihave_id": _best(lambda: ps_b.seen_messages.has(safe_bytes_from_hex(mid))),
            }
            for n in (10, 1000):
                m = Membership()
                for i in range(n):
                    m = apply(m, StateSeen(f"p{i}", st, 0.0, 0.0))
                ev = StateSeen("p0", st.model_copy(update={"seq": 2}), 1.0, 1.0)
                costs[f"apply_{n}"] = _best(lambda: apply(m, ev), 1000)
            costs["apply_per_peer"] = (costs["apply_1000"] - costs["apply_10"]) / 990
            costs["apply_base"] = costs["apply_10"] - 10 * costs["apply_per_peer"]
            other = sample_keyring(tmp / "ring2", 0)
            records = ring.wire()
            other.merge(records)
            costs["merge_per_record"] = _best(lambda: other.merge(records), 500) / len(records)

            # end to end: states from A until B's view holds the last one
            e2e = float("inf")
            count = 600
            for rnd in range(2):
                seq0 = (rnd + 2) * 100_000
                states = [seal(st.model_copy(update={"seq": seq0 + i}), key) for i in range(count)]
                last = seq0 + count - 1
                c0 = time.process_time()
                for i, d in enumerate(states):
                    await ps_a.publish(TOPIC, d)
                    if i % 8 == 7:     # keep py-libp2p's 32-RPC outbound queue from overflowing
                        target = seq0 + i - 8
                        await b.view.wait_for(lambda v: v.get(a.peer_id).state.seq >= target, 10)
                ok = await b.view.wait_for(lambda v: v.get(a.peer_id).state.seq >= last, 20)
                assert ok, "B did not get A's last state"
                e2e = min(e2e, (time.process_time() - c0) / count - costs["seal"])
            costs["e2e"] = e2e
            covered = (costs["sign"] + costs["serialize"] + costs["parse"] + costs["envelope"]
                       + costs["seen"] + costs["verify"] + 2 * costs["open"] + costs["apply_10"])
            costs["residual"] = max(0.0, e2e - covered)
            sizes = {
                "state_keys5": len(data),
                "state_nokeys": len(seal(st.model_copy(update={"keys": []}), key)),
                "key_record": (len(data) - len(seal(st.model_copy(update={"keys": []}), key))) / 5,
                "rpc_overhead": len(raw) - len(data),
                "sender_record": len(rpc.senderRecord),
                "ihave_per_id": (len(ihave.SerializeToString()) - len(rpc.senderRecord)) / 100,
            }
    return {"costs_s": costs, "sizes_bytes": sizes, "machine": {
        "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M")}}


def calibrate() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return trio.run(_measure, Path(tmp))


def load() -> dict[str, Any]:
    return json.loads(OUT.read_text())


def main() -> None:
    out = calibrate()
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    c = out["costs_s"]
    for k, v in c.items():
        print(f"{k:18s} {v * 1e6:9.1f} us")
    for k, v in out["sizes_bytes"].items():
        print(f"{k:18s} {v:9.1f} B")
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
