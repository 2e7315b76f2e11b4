"""``python -m bench.sim``: run the simulator and print its table.

    .venv/bin/python -m bench.sim --nodes 100                  # v1 and current, LAN, churn
    .venv/bin/python -m bench.sim --nodes 1000 --seconds 30 --design current
    .venv/bin/python -m bench.sim --nodes 100 --net wan --sites 4 --design current@50
    .venv/bin/python -m bench.sim --nodes 100 --json out.json  # every figure, per run

``--design`` takes ``v1``, ``current``, ``current@RATE`` (another mesh-wide budget), or
a comma-separated list of them; each runs with the same seed (same nodes, links, churn
and requests, as far as the designs let them coincide).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import fields

from bench.sim.report import table
from bench.sim.sim import Scenario, run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__.splitlines()[0])
    defaults = Scenario()
    ap.add_argument("--design", default="v1,current")
    for f in fields(Scenario):
        if f.name == "design":
            continue
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                        default=getattr(defaults, f.name))
    ap.add_argument("--json", help="write every figure of every run to this file")
    args = ap.parse_args(argv)
    rows = []
    for name in args.design.split(","):
        sc = Scenario(**{f.name: getattr(args, f.name) for f in fields(Scenario) if f.name != "design"},
                      design=name)
        t0 = time.perf_counter()
        row = run(sc)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"# {name}: {sc.nodes} nodes, {sc.seconds:.0f} s simulated in {row['wall_s']:.0f} s wall "
              f"({row['sim_events']:,} events); dropped {row['dropped_queue']}, not relayed "
              f"{row['not_relayed']}, repaired {row['repaired']}, duplicates/first {row['dup_ratio']:.1f}",
              file=sys.stderr, flush=True)
    print(f"{args.nodes} nodes, {args.net}, loss {args.loss:g}, churn {args.churn:g}/node/min, "
          f"load {args.load:g}, {args.keys} keys, seed {args.seed}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                       for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
