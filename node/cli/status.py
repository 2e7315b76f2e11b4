"""`mesh status`: the nodes of the mesh and the models each serves, readable at a glance.

Compact (the default) is laid out for the terminal's width (80 columns when it is not a
terminal): a block per node, a header line and its models as `id×slots busy/queued`
(and `wait~Ns` when a request sent now would queue that long),
then an index of models -> nodes. Nothing is cut: node names and model ids are whole, and
a line too long goes on in the next one at the boundary between two items, never inside
one (only a single item wider than the terminal can pass its edge). `--wide` prints every
field in full (ids, API URLs, addresses) as tables sized to their content; `--json` the
`/mesh/status` document as the node sends it; `--watch` redraws in place every second.
"""

from __future__ import annotations

import time
from typing import Iterable

import click
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from node.cli.common import node_options, print_json, request

GAP = "  "


def _gib(n) -> str:
    return f"{(n or 0) / 2**30:.1f}G"


def short_id(node_id: str | None) -> str:
    return "…" + node_id[-8:] if node_id else "-"


def _host(api: str | None) -> str:
    return (api or "-").split("://", 1)[-1]


def _model_item(m: dict) -> str:
    """`id×slots busy/queued`, then what is worth knowing at a glance."""
    item = f"{m.get('id', '?')}×{m.get('slots') or 0} {m.get('busy') or 0}/{m.get('queued') or 0}"
    if m.get("state", "loaded") != "loaded":
        item += f" ({m.get('state')})"
    if m.get("tokens_per_s"):
        item += f" {m['tokens_per_s']:.0f}t/s"
    if float(m.get("wait_s") or 0) >= 0.5:         # a new request would queue this long
        item += f" wait~{float(m['wait_s']):.0f}s"
    split = m.get("split") or {}
    if split.get("nodes"):
        item += " split " + "+".join(map(str, split["nodes"]))
    return item


def pack(items: Iterable[Text | str], width: int, indent: int = 0, sep: str = GAP) -> list[Text]:
    """Items on lines of at most `width` columns, a line break only between two items."""
    lines: list[Text] = []
    line = Text(" " * indent)
    fresh = True
    for item in items:
        item = item if isinstance(item, Text) else Text(item)
        if not fresh and line.cell_len + len(sep) + item.cell_len > width:
            lines.append(line)
            line, fresh = Text(" " * (indent + 2)), True
        if not fresh:
            line.append(sep)
        line.append_text(item)
        fresh = False
    lines.append(line)
    return lines


def compact(status: dict, width: int = 80) -> list[Text]:
    nodes = status.get("nodes", [])
    alive = sum(1 for n in nodes if n.get("state") == "alive")
    me = (status.get("self") or {}).get("name") or (nodes[0]["name"] if nodes else "?")
    head = [Text(f"mesh {status['mesh']}" if status.get("mesh") else "single node (no mesh token)",
                 style="bold"), f"{len(nodes)} nodes, {alive} alive", f"asked {me}"]
    out = pack(head, width, sep=" · ")
    now = time.time()
    where: dict[str, list[str]] = {}
    for i, n in enumerate(nodes):
        mem = n.get("memory") or {}
        state = str(n.get("state"))
        cells: list[Text | str] = [
            Text(f"● {n.get('name')}", style="bold " + ("green" if state == "alive" else "yellow")),
            Text(state, style="green" if state == "alive" else "yellow"), short_id(n.get("id"))]
        if i == 0:
            cells.append("this node")
        else:
            if n.get("rtt_ms") is not None:
                cells.append(f"rtt {n['rtt_ms']:.1f}ms")
            cells.append(f"seen {max(0.0, now - float(n.get('last_seen') or now)):.0f}s")
        cells.append(f"RAM {_gib(mem.get('ram_free'))[:-1]}/{_gib(mem.get('ram_total'))} free")
        if mem.get("vram_total"):
            cells.append(f"VRAM {_gib(mem.get('vram_free'))[:-1]}/{_gib(mem.get('vram_total'))} free")
        cells.append(f"load {float(n.get('load') or 0):.2f}")
        rpc = n.get("rpc") or {}
        if rpc.get("offered"):
            cells.append(f"lends {_gib(rpc.get('free'))[:-1]}/{_gib(rpc.get('offered'))} free")
            if str(rpc.get("isolation") or "").startswith("none"):
                cells.append(Text("RPC server open to local users", style="yellow"))
        cells.append(_host(n.get("api")))
        out.append(Text(""))
        out += pack(cells, width)
        models = n.get("models", [])
        out += pack([_model_item(m) for m in models] or [Text("no models", style="dim")],
                    width, indent=4, sep="   ")
        for m in models:
            split = m.get("split") or {}
            on = f" split: {'+'.join(map(str, split['nodes']))}" if split.get("nodes") else ""
            where.setdefault(m.get("id", "?"), []).append(f"{n.get('name')} [{m.get('state', '?')}{on}]")
    if where:
        out += [Text(""), Text("models", style="bold")]
        col = min(max(len(k) for k in where), width // 2)
        for model, at in sorted(where.items()):
            first = Text(model.ljust(col))
            lines = pack([first, *at], width, sep=GAP)
            out += lines
    for w in status.get("warnings", []):
        out.append(Text(""))
        out += pack([Text(x, style="bold red") for x in f"warning: {w}".split()], width, sep=" ")
    return out


def wide(status: dict) -> Group:
    """Every field in full: nodes, then models -> nodes."""
    nodes = Table(title="nodes")
    for col in ("name", "id", "state", "api", "addrs", "rtt", "models (slots busy/queued tok/s)",
                "RAM free", "VRAM free", "RPC lent free", "load", "seen"):
        nodes.add_column(col, no_wrap=True)
    by_model: dict[str, list[str]] = {}
    now = time.time()
    for n in status.get("nodes", []):
        mem, rpc = n.get("memory") or {}, n.get("rpc") or {}
        models = []
        for m in n.get("models", []):
            split = m.get("split") or {}
            on = f" split: {'+'.join(map(str, split['nodes']))}" if split.get("nodes") else ""
            models.append(f"{m.get('id')} [{m.get('state')}] {m.get('slots') or 0} "
                          f"{m.get('busy') or 0}/{m.get('queued') or 0} "
                          f"{float(m.get('tokens_per_s') or 0):.1f}"
                          + (f" wait~{float(m['wait_s']):.0f}s" if float(m.get("wait_s") or 0) >= 0.5 else "")
                          + on)
            by_model.setdefault(m.get("id", "?"), []).append(f"{n.get('name')} [{m.get('state')}{on}]")
        seen = max(0.0, now - float(n.get("last_seen") or now))
        rtt = "-" if n.get("rtt_ms") is None else f"{n['rtt_ms']:.2f} ms"
        lent = f"{_gib(rpc.get('free'))} of {_gib(rpc.get('offered'))}" if rpc.get("offered") else "-"
        if rpc.get("offered") and rpc.get("isolation"):
            lent += f"\nisolation: {rpc['isolation']}"
        nodes.add_row(escape(str(n.get("name"))), str(n.get("id") or "-"), str(n.get("state")),
                      str(n.get("api") or "-"), "\n".join(n.get("addrs") or []) or "-", rtt,
                      escape("\n".join(models)) or "-", _gib(mem.get("ram_free")),
                      _gib(mem.get("vram_free")), lent, f"{float(n.get('load') or 0):.2f}",
                      f"{seen:.0f}s ago")
    models = Table(title="models")
    models.add_column("model", no_wrap=True)
    models.add_column("nodes", no_wrap=True)
    for model, at in sorted(by_model.items()):
        models.add_row(model, escape(", ".join(at)))
    parts = [nodes, models]
    parts += [Text(f"warning: {w}", style="bold red") for w in status.get("warnings", [])]
    return Group(*parts)


@click.command()
@node_options
@click.option("--wide", "full", is_flag=True, help="Every field in full (ids, URLs, addresses).")
@click.option("--watch", is_flag=True, help="Redraw in place every second until Ctrl-C.")
def status(url, key, as_json, full, watch) -> None:
    """Show every node of the mesh, what it has loaded and what it has free."""
    if as_json and watch:
        raise click.UsageError("--watch redraws the view; for scripts, poll `mesh status --json`")
    if as_json:
        print_json(request("GET", url, "/mesh/status", key=key))
        return
    console = Console()

    def view(st: dict):
        return wide(st) if full else Group(*compact(st, console.width))

    if full:
        console = Console(width=max(console.width, 400))   # tables at their natural width
    if not watch:
        console.print(view(request("GET", url, "/mesh/status", key=key)))
        return
    def frames():
        while True:
            try:
                yield view(request("GET", url, "/mesh/status", key=key))
            except click.ClickException as exc:           # the node restarting: keep watching
                yield Text(f"{exc.message} (retrying every second)", style="bold red")
            time.sleep(1)

    try:
        if not console.is_terminal:                       # a pipe or a file: one frame after another
            for frame in frames():
                console.print(frame, Text(""))
        with Live(console=console, auto_refresh=False) as live:
            for frame in frames():
                live.update(frame, refresh=True)
    except KeyboardInterrupt:                             # Ctrl-C is how a watch ends
        return
