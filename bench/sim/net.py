"""Links between virtual nodes: latency, loss and uplink bandwidth.

Profiles (one-way latency; a node's uplink rate):

    lan   one switched network: 0.2 ms + exponential jitter (mean 0.1 ms); 1 Gb/s
    wan   nodes spread round-robin over ``sites``; within a site as lan, between two sites
          10-80 ms (fixed per site pair, drawn from the seed); 100 Mb/s

Loss: gossipsub rides TCP, so a lost segment is resent, not lost: with probability
``loss`` a copy arrives one RTO (200 ms, Linux's minimum) plus one round trip late.
Head-of-line blocking of the copies queued behind it on that connection is left out.
Uplink: the copies a node sends leave one after another at its uplink rate (a FIFO per
node), so a node that sends a lot also delays what it sends.
"""

from __future__ import annotations

import random

__all__ = ["PROFILES", "Links"]

RTO = 0.2
PROFILES = {"lan": {"base": 0.0002, "jitter": 0.0001, "uplink_bps": 1e9, "wan": (0.0, 0.0)},
            "wan": {"base": 0.0002, "jitter": 0.0001, "uplink_bps": 1e8, "wan": (0.010, 0.080)}}


class Links:
    def __init__(self, profile: str, *, rng: random.Random, sites: int = 4, loss: float = 0.0) -> None:
        p = PROFILES[profile]
        self.profile = profile
        self.rng = rng
        self.loss = loss
        self.sites = sites if profile == "wan" else 1
        self.base, self.jitter, self.uplink_bps = p["base"], p["jitter"], p["uplink_bps"]
        lo, hi = p["wan"]
        pair = random.Random(rng.random())
        self._site_lat = [[0.0] * self.sites for _ in range(self.sites)]
        for a in range(self.sites):
            for b in range(a + 1, self.sites):
                self._site_lat[a][b] = self._site_lat[b][a] = lo + (hi - lo) * pair.random()
        self._tx_free: dict[int, float] = {}
        self.late = 0                           # copies that waited for a retransmission

    def site(self, i: int) -> int:
        return i % self.sites

    def latency(self, u: int, v: int) -> float:
        """Mean one-way latency between two nodes (no jitter, no loss)."""
        return self.base + self.jitter + self._site_lat[u % self.sites][v % self.sites]

    def rtt(self, u: int, v: int) -> float:
        return 2 * self.latency(u, v)

    def send(self, u: int, v: int, size: int, t: float) -> float:
        """When a copy of ``size`` bytes that ``u`` sends at ``t`` reaches ``v``."""
        leave = max(t, self._tx_free.get(u, 0.0)) + size * 8 / self.uplink_bps
        self._tx_free[u] = leave
        arrive = leave + self.base + self.rng.expovariate(1 / self.jitter) + self._site_lat[u % self.sites][v % self.sites]
        if self.loss and self.rng.random() < self.loss:
            self.late += 1
            arrive += RTO + self.rtt(u, v)
        return arrive
