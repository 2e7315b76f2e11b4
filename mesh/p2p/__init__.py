"""The mesh's libp2p layer: the only package of inference-mesh that imports libp2p.

    node        ``open_p2p(...) -> P2P``: composes everything below; pings, dials, ticks
    host        the libp2p host: TCP + pnet + Noise only + yamux, and its settings
    pnet        the private network: a token-keyed TCP transport with a key check
    stream      ``Stream``: a libp2p stream with EOF, errors and release made safe
    ping        ``/mesh/ping/1`` RTT samples for the view
    admission   the HMAC challenge-response every connection passes; handler gate
    gossip      gossipsub ``mesh/state/1`` with our settings and a validator
    identity    the persisted Ed25519 node key
    discovery   mDNS (zeroconf) and static peers, re-dialed with backoff

Every py-libp2p 0.8.1 quirk we work around, and where:

- The default security list accepts plaintext and secio: Noise only (host, ``sec_opt``).
- ``max_connections_per_peer`` 3 makes every connect wait 250 ms: 1 (host).
- A failed dial retries 3x, each bounded only by the 10 s upgrade timeout: no retries, our
  own deadlines (host, ``RetryConfig``); inbound upgrade 5 s instead of 10 (host).
- The inbound limiter never releases a slot of a closed connection, so a node refuses
  every connection after 250 reconnects: limits raised to 10,000 (host).
- The AutoConnector dials every peer in the peerstore, denied ones and other meshes
  included: stopped once the host runs (host).
- Leaving ``host.run()`` leaves the listening socket open: ``host.close()`` explicitly,
  bounded (host). Binding uses SO_REUSEPORT, so two nodes could share a port: a fixed
  port is checked first (host, ``_check_port_free``).
- ``dial_peer`` tries one address per transport: we try each address in order (host, ``dial``).
- The built-in pnet has no key check (a wrong token hangs 20-30 s): our own pnet with a
  one-round-trip check (pnet).
- yamux answers pings under the data-write lock, which deadlocks two-way bulk traffic:
  write-behind queue and one sender per connection (pnet); read-ahead and
  ``PY_YAMUX_RELEASE_ON_READ=0`` for bulk speed (pnet, host).
- A stream handler that raises leaves its stream open and its peer waiting forever: every
  handler's stream is closed or reset when it returns (node, ``set_handler``).
- Reads raise StreamEOF at EOF and a zoo of exceptions otherwise: b"" and PeerError
  (stream). A reader that stops reading fails the writer after 5 s (yamux window timeout):
  documented; callers bound their reads.
- An exception escaping the pubsub stream handler tears down the connection's tasks:
  guarded (gossip). GossipSub's 120 s heartbeat and adaptive gossip: 1 s, off; its
  per-forwarder rate limit of 10 msg/s drops healthy relays: raised (gossip).
- ``enable_mDNS`` reports finds through a process-global singleton and blocks the trio
  thread 1.6 s: zeroconf directly, one instance per mesh, registration in a thread
  (discovery). mDNS PTR TTLs are forced to 1125 s, so liveness comes from gossip (view).
- Expected churn is logged at ERROR with tracebacks through ``logging.lastResort``: the
  ``libp2p`` logger is raised to CRITICAL unless LIBP2P_DEBUG is set (node).
"""

from mesh.p2p.node import P2P, open_p2p
from mesh.p2p.stream import Stream

__all__ = ["P2P", "Stream", "open_p2p"]
