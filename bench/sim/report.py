"""A run's figures, and the table ``python -m bench.sim`` prints.

Per-node rates are over the measured window and over the nodes that were up for all of
it; "p99 node" is the 99th percentile of those nodes (the busiest, in a small mesh).
A spread or revocation time is the time until 99% of the observers that were up and
not frozen both when it started and at the end hold it; "never" counts those that did
not get there before the run ended.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.sim.sim import Sim

__all__ = ["summarize", "table"]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _t99(sim: "Sim", p: Any) -> float:
    final = {i for i in p.eligible if sim.nodes[i].up and not sim.nodes[i].frozen}
    need = math.ceil(0.99 * len(final))
    got = sorted(t for i, t in p.got.items() if i in final)
    return got[need - 1] if need and len(got) >= need else math.inf


def summarize(sim: "Sim") -> dict[str, Any]:
    sc, g = sim.sc, sim.gossip
    start = sim._start
    dur = sim.loop.now - start["t"]
    t0, t1 = start["traffic"], g.traffic.snapshot()
    steady = [i for i in start["up"] if sim.nodes[i].up]
    per = {k: [(t1[k][i] - t0[k][i]) / dur for i in steady] for k in t1}
    downs: dict[int, list[float]] = {}
    for t, kind, v, _ in sim.churn_log:
        if kind in ("leave", "freeze"):
            downs.setdefault(v, []).append(t)
    # a probe whose own node left or froze before it could spread measures nothing
    spreads = [_t99(sim, p) for p in sim.probes
               if not any(p.t <= t <= p.t + 30 for t in downs.get(p.origin, ()))]
    done = [s for s in spreads if math.isfinite(s)]
    freezes = [_t99(sim, f) for f in sim.freezes]
    revs = [_t99(sim, r) for r in sim.revocations]
    observers = [i for i in steady if sim.nodes[i].observer]
    obs_hours = len(observers) * dur / 3600
    r = sim.req
    gc = {k: getattr(g, k) - start["gossip"][k] for k in start["gossip"]}
    daemon_cpu = sim.daemon_merge_records * sim.costs.merge_per_record / max(1, len(observers)) / dur
    return {
        "design": sim.design.name, "nodes": sc.nodes, "net": sc.net, "loss": sc.loss, "churn": sc.churn,
        "seconds": dur, "observers": len(observers),
        "spread_p50_s": _pct(done, 0.5), "spread_p90_s": _pct(done, 0.9), "spread_max_s": max(done, default=math.nan),
        "spread_never": len(spreads) - len(done), "probes": len(spreads),
        "msgs_in_per_s": statistics.fmean(per["msgs_in"]), "msgs_in_p99": _pct(per["msgs_in"], 0.99),
        "kb_in_per_s": statistics.fmean(per["bytes_in"]) / 1e3, "kb_in_p99": _pct(per["bytes_in"], 0.99) / 1e3,
        "kb_out_per_s": statistics.fmean(per["bytes_out"]) / 1e3,
        "ping_kb_per_s": statistics.fmean(per["ping_bytes"]) / 1e3,
        "cpu_mean": statistics.fmean(per["cpu"]), "cpu_p99": _pct(per["cpu"], 0.99),
        "daemon_merge_cpu": daemon_cpu,
        "states_per_s": (sim.publishes - start["publishes"]) / dur,
        "false_suspicions": sim.false_suspicions,
        "false_per_obs_hour": sim.false_suspicions / obs_hours if obs_hours else math.nan,
        "true_suspicions": sim.true_suspicions,
        "freeze_detect_p50_s": _pct([f for f in freezes if math.isfinite(f)], 0.5),
        "freezes": len(freezes), "freeze_never": sum(not math.isfinite(f) for f in freezes),
        "requests": r["total"], "remote": r["remote"],
        "no_free_slot_pct": 100 * r["no_free_slot"] / r["remote"] if r["remote"] else math.nan,
        "random_full_pct": 100 * r["random_full"] / r["remote"] if r["remote"] else math.nan,
        "all_full_pct": 100 * r["all_full"] / r["remote"] if r["remote"] else math.nan,
        "to_frozen_pct": 100 * r["to_frozen"] / r["total"] if r["total"] else math.nan,
        "queued_pct": 100 * r["queued"] / r["total"] if r["total"] else math.nan,
        "wait_mean_s": r["wait_s"] / r["total"] if r["total"] else math.nan,
        "failed": r["failed"],
        "revocation_s": revs, "joiner_keys_p50_s": _pct(sim.joiner_keys, 0.5), "joins": len(sim.joiner_keys),
        "dropped_queue": gc["dropped_queue"], "not_relayed": gc["not_relayed"], "repaired": gc["repaired"],
        "dup_ratio": gc["duplicates"] / gc["first_copies"] if gc["first_copies"] else math.nan,
        "churn_events": sum(1 for e in sim.churn_log if e[1] in ("leave", "freeze")),
        "max_down_seen": max((e[3] for e in sim.churn_log), default=0),
        "sim_events": sim.loop.events,
    }


def _f(x: float, spec: str = ".2f") -> str:
    if isinstance(x, float) and math.isinf(x):
        return "never"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return format(x, spec)


COLUMNS = [
    ("design", "design", "s"), ("nodes", "nodes", "d"),
    ("spread p50/p90 s", lambda r: f"{_f(r['spread_p50_s'], '.3f')}/{_f(r['spread_p90_s'], '.3f')}"
     + (f" ({r['spread_never']} never)" if r["spread_never"] else ""), None),
    ("states/s", "states_per_s", ".0f"),
    ("msgs in/node/s", "msgs_in_per_s", ".0f"),
    ("KB in/node/s", lambda r: f"{_f(r['kb_in_per_s'], '.0f')} (p99 {_f(r['kb_in_p99'], '.0f')})", None),
    ("ping KB/s", "ping_kb_per_s", ".1f"),
    ("gossip CPU", lambda r: f"{100 * r['cpu_mean']:.0f}% (p99 {100 * r['cpu_p99']:.0f}%)", None),
    ("key-merge loop CPU", lambda r: f"{100 * r['daemon_merge_cpu']:.0f}%", None),
    ("false susp./obs-h", "false_per_obs_hour", ".2f"),
    ("freeze seen 99% s", "freeze_detect_p50_s", ".1f"),
    ("no free slot % (random, all full)", lambda r: f"{_f(r['no_free_slot_pct'], '.1f')} "
     f"({_f(r['random_full_pct'], '.0f')}, {_f(r['all_full_pct'], '.0f')})", None),
    ("to frozen %", "to_frozen_pct", ".2f"),
    ("revocation 99% s", lambda r: "/".join(_f(x) for x in r["revocation_s"]) or "-", None),
    ("joiner has keys s", "joiner_keys_p50_s", ".2f"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """The runs as a Markdown table (one row per run)."""
    head = [c[0] for c in COLUMNS]
    body = []
    for r in rows:
        cells = []
        for _, key, spec in COLUMNS:
            cells.append(key(r) if callable(key) else _f(r[key], spec) if spec != "s" else str(r[key]))
        body.append(cells)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c) + " |" for c in body]
    return "\n".join(out)
