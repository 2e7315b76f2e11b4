"""``python -m bench.sim.figures``: the PNGs of docs/scale.md from bench/sim/results/*.json.

Each results file is what ``python -m bench.sim --json FILE`` wrote: a list of runs, one
per design (bench/sim/report.py ``summarize``). The commands that made them are in
bench/sim/results/README.md. Runs are grouped so:

- the scale series: LAN runs with the default loss and churn (1%, 0.02/node/min), one
  line per design against the node count;
- variants: every run at ``--variants-at`` nodes (100), one bar group per scenario
  (LAN, WAN, loss/churn...), one bar per design.

    .venv/bin/python -m bench.sim.figures                  # writes docs/scale/*.png
    .venv/bin/python -m bench.sim.figures --out /tmp/figs  # elsewhere
    .venv/bin/python -m bench.sim.figures --tables         # docs/scale.md's tables (no matplotlib)

Needs matplotlib (``pip install -e .[bench]``); nothing else in the project imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parents[1] / "docs" / "scale"
DEFAULT_LOSS, DEFAULT_CHURN = 0.01, 0.02
COLORS = {"v1": "tab:red", "current": "tab:blue"}

__all__ = ["load", "tables", "main"]


def load(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every run of every results file, each tagged with its file's stem (``run``)."""
    rows = []
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not JSON ({e})")
        if not isinstance(data, list):
            raise SystemExit(f"{path}: expected a list of runs (python -m bench.sim --json)")
        for r in data:
            r["run"] = path.stem
            # a run's JSON does not name its --router; the file name does (results/README.md)
            r.setdefault("router", "two-choices" if "two-choices" in path.stem else "product")
            rows.append(r)
    return rows


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _scenario(r: dict[str, Any]) -> str:
    parts = [r["net"]]
    if r["loss"] != DEFAULT_LOSS:
        parts.append(f"loss {100 * r['loss']:g}%")
    if r["churn"] != DEFAULT_CHURN:
        parts.append(f"churn {r['churn']:g}/node/min")
    if r["router"] != "product":
        parts.append(f"{r['router']} router")
    return ", ".join(parts)


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The scale series: per design, LAN runs with default loss, churn and router, by node count
    (the longest run where one node count ran twice)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r["net"] != "lan" or r["loss"] != DEFAULT_LOSS or r["churn"] != DEFAULT_CHURN or r["router"] != "product":
            continue
        by_n = out.setdefault(r["design"], {})
        old = by_n.get(r["nodes"])
        if old is None or r["seconds"] > old["seconds"]:
            by_n[r["nodes"]] = r
    return {d: [by_n[n] for n in sorted(by_n)] for d, by_n in sorted(out.items())}


def _color(design: str) -> str | None:
    return COLORS.get(design.partition("@")[0]) if "@" not in design else None


def _lines(ax: Any, series: dict[str, list[dict[str, Any]]], key: str, *, label: str = "", style: str = "-o",
           scale: float = 1.0) -> None:
    for d, rs in series.items():
        xs = [r["nodes"] for r in rs]
        ys = [_num(r[key]) * scale for r in rs]
        ax.plot(xs, ys, style, color=_color(d), label=f"{d}{label}")
        for x, y, r in zip(xs, ys, rs):
            if r.get("seconds", 60) < 59:
                ax.annotate(f"{r['seconds']:.0f} s run", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color="gray")


def _axes(ax: Any, title: str, ylabel: str, *, logy: bool = False) -> None:
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def figures(rows: list[dict[str, Any]], out: Path, variants_at: int) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    series = _series(rows)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 1. propagation: time for a state change to reach 99% of the nodes
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, series, "spread_p50_s", label=" median")
    _lines(ax, series, "spread_p90_s", label=" p90", style="--s")
    _axes(ax, "A state change reaching 99% of the nodes (LAN)", "seconds", logy=True)
    save(fig, "propagation.png")

    # 2. traffic per node
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    _lines(a1, series, "msgs_in_per_s")
    _axes(a1, "Gossip messages received per node per second", "messages/s", logy=True)
    _lines(a2, series, "kb_in_per_s", label=" mean")
    _lines(a2, series, "kb_in_p99", label=" p99 node", style="--s")
    _axes(a2, "Gossip bytes received per node per second", "KB/s", logy=True)
    save(fig, "traffic.png")

    # 3. CPU per node
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, series, "cpu_mean", label=" gossip, mean", scale=100)
    _lines(ax, series, "cpu_p99", label=" gossip, p99 node", style="--s", scale=100)
    _lines(ax, series, "daemon_merge_cpu", label=" key-merge loop", style=":^", scale=100)
    ax.axhline(100, color="black", lw=0.8)
    _axes(ax, "CPU per node: gossip, and node/daemon.py's key-merge loop", "% of one core", logy=True)
    save(fig, "cpu.png")

    # 4. false suspicions
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, series, "false_per_obs_hour")
    ax.set_yscale("symlog", linthresh=1)
    _axes(ax, "False suspicions (a live peer turned suspect)", "per observer-hour")
    save(fig, "suspicions.png")

    # 5. routing quality
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, series, "no_free_slot_pct", label=": router")
    _lines(ax, series, "random_full_pct", label=": a random server", style=":x")
    _axes(ax, "Remote requests sent to a server with no free slot", "% of remote requests")
    ax.set_ylim(0, 100)
    save(fig, "routing.png")

    # 6. variants at one node count
    at = [r for r in rows if r["nodes"] == variants_at]
    scen = sorted({_scenario(r) for r in at}, key=lambda s: (s != "lan", s))
    designs = sorted({r["design"] for r in at})
    if scen and designs:
        metrics = [("spread_p90_s", "p90 time to 99% (s)"), ("kb_in_per_s", "KB in/node/s"),
                   ("false_per_obs_hour", "false suspicions/obs-h"), ("no_free_slot_pct", "no free slot %")]
        fig, axs = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4))
        width = 0.8 / len(designs)
        for ax, (key, title) in zip(axs, metrics):
            for k, d in enumerate(designs):
                vals = []
                for s in scen:
                    hit = [r for r in at if r["design"] == d and _scenario(r) == s]
                    vals.append(_num(hit[0][key]) if hit else math.nan)
                xs = [i + (k - (len(designs) - 1) / 2) * width for i in range(len(scen))]
                ax.bar(xs, vals, width, color=_color(d), label=d)
            ax.set_xticks(range(len(scen)))
            ax.set_xticklabels(scen, rotation=20, ha="right", fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
        handles, labels = axs[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", fontsize=8)
        fig.suptitle(f"{variants_at} nodes: scenarios", fontsize=11)
        save(fig, "variants.png")
    return written


def _f(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "never"
    return format(x, spec)


_HEAD = [
    ("design", lambda r: r["design"]),
    ("nodes", lambda r: str(r["nodes"])),
    ("scenario", _scenario),
    ("measured s", lambda r: _f(r["seconds"], ".0f")),
]
COST = _HEAD + [
    ("states/s", lambda r: _f(r["states_per_s"], ".0f")),
    ("msgs in/node/s", lambda r: _f(r["msgs_in_per_s"], ".0f")),
    ("KB in/node/s (p99)", lambda r: f"{_f(r['kb_in_per_s'], '.0f')} ({_f(r['kb_in_p99'], '.0f')})"),
    ("KB out/node/s", lambda r: _f(r["kb_out_per_s"], ".0f")),
    ("ping KB/s", lambda r: _f(r["ping_kb_per_s"], ".1f")),
    ("gossip CPU (p99)", lambda r: f"{_f(100 * _num(r['cpu_mean']), '.0f')}% ({_f(100 * _num(r['cpu_p99']), '.0f')}%)"),
    ("key-merge loop CPU", lambda r: f"{_f(100 * _num(r['daemon_merge_cpu']), '.0f')}%"),
    ("copies dropped", lambda r: str(r["dropped_queue"])),
]
BEHAVIOUR = _HEAD + [
    ("to 99%: p50 / p90 / max s", lambda r: f"{_f(r['spread_p50_s'], '.2f')} / {_f(r['spread_p90_s'], '.2f')} / "
     f"{_f(r['spread_max_s'], '.2f')}" + (f" ({r['spread_never']} of {r['probes']} never)" if r["spread_never"] else "")),
    ("false susp. (per obs-h)", lambda r: f"{r['false_suspicions']} ({_f(_num(r['false_per_obs_hour']), '.1f')})"),
    ("freeze suspected by 99%: p50 s", lambda r: _f(_num(r["freeze_detect_p50_s"]), ".1f")
     + (f" ({r['freeze_never']} of {r['freezes']} never)" if r["freeze_never"] else "")),
    ("no free slot % (random server)", lambda r: f"{_f(_num(r['no_free_slot_pct']), '.1f')} "
     f"({_f(_num(r['random_full_pct']), '.0f')})"),
    ("to frozen %", lambda r: _f(_num(r["to_frozen_pct"]), ".2f")),
    ("revocation 99% s", lambda r: " / ".join(_f(_num(x), ".2f") for x in r["revocation_s"]) or "-"),
]


def tables(rows: list[dict[str, Any]], variants_at: int = 100) -> str:
    """docs/scale.md's tables, Markdown: the LAN scale series, then every run at
    ``variants_at`` nodes; each as what it costs, then how the mesh behaves."""
    series = [r for rs in _series(rows).values() for r in rs]
    series.sort(key=lambda r: (r["nodes"], r["design"]))
    variants = sorted((r for r in rows if r["nodes"] == variants_at),
                      key=lambda r: (_scenario(r) != "lan", _scenario(r), r["design"]))
    out = []
    for title, rs in ((f"LAN, loss {100 * DEFAULT_LOSS:g}%, churn {DEFAULT_CHURN:g}/node/min", series),
                      (f"{variants_at} nodes, every scenario", variants)):
        for part, cols in (("cost", COST), ("behaviour", BEHAVIOUR)):
            out += [f"#### {title}: {part}", "", "| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
            out += ["| " + " | ".join(fn(r) for _, fn in cols) + " |" for r in rs]
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sim.figures", description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of --json files")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs")
    ap.add_argument("--variants-at", type=int, default=100, help="node count of the scenario bars")
    ap.add_argument("--tables", action="store_true", help="print the Markdown tables instead")
    args = ap.parse_args(argv)
    rows = load(args.results)
    if not rows:
        raise SystemExit(f"{args.results}: no results (*.json from python -m bench.sim --json)")
    if args.tables:
        print(tables(rows, args.variants_at))
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("matplotlib is missing: pip install -e .[bench]")
    for path in figures(rows, args.out, args.variants_at):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
