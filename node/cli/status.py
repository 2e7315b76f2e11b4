"""`mesh status`: the nodes of the mesh and the models each serves."""

from __future__ import annotations

import time

import click
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from node.cli.common import node_options, print_json, request


def _gib(n) -> str:
    return f"{(n or 0) / 2**30:.1f} GiB"


def _rpc(rpc: dict | None) -> str:
    if not rpc or not rpc.get("offered"):
        return "-"
    return f"{_gib(rpc.get('free'))} of {_gib(rpc.get('offered'))}"


def render(status: dict) -> Group:
    """The status as rich tables: nodes, then models -> nodes."""
    nodes = Table(title="nodes")
    for col in ("name", "id", "state", "api", "models", "RAM free", "VRAM free", "RPC lent free",
                "load", "seen"):
        nodes.add_column(col)
    by_model: dict[str, list[str]] = {}
    now = time.time()
    for n in status.get("nodes", []):
        mem = n.get("memory") or {}
        models = []
        for m in n.get("models", []):
            state = m.get("state", "?")
            split = m.get("split") or {}
            where = (f" split: {'+'.join(map(str, split.get('nodes') or []))}"
                     if split.get("nodes") else "")
            models.append(m.get("id", "?") + ("" if state == "loaded" else f" ({state})") + where)
            by_model.setdefault(m.get("id", "?"), []).append(f"{n.get('name')} [{state}{where}]")
        seen = max(0.0, now - float(n.get("last_seen") or now))
        nodes.add_row(escape(str(n.get("name"))), str(n.get("id") or "-")[-12:], str(n.get("state")),
                      str(n.get("api") or "-"), ", ".join(models) or "-",
                      _gib(mem.get("ram_free")), _gib(mem.get("vram_free")), _rpc(n.get("rpc")),
                      f"{float(n.get('load') or 0):.2f}", f"{seen:.0f}s ago")
    models = Table(title="models")
    models.add_column("model")
    models.add_column("nodes")
    for model, where in sorted(by_model.items()):
        models.add_row(model, escape(", ".join(where)))
    parts = [nodes, models]
    parts += [Text(f"warning: {w}", style="bold red") for w in status.get("warnings", [])]
    return Group(*parts)


@click.command()
@node_options
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
def status(url, key, as_json, watch) -> None:
    """Show every node of the mesh, what it has loaded and what it has free."""
    if as_json:
        print_json(request("GET", url, "/mesh/status", key=key))
        return
    console = Console()
    if not watch:
        console.print(render(request("GET", url, "/mesh/status", key=key)))
        return
    with Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(render(request("GET", url, "/mesh/status", key=key)), refresh=True)
            time.sleep(1)
