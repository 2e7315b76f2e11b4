"""`mesh nodes [list]` and `mesh nodes revoke ID`: the machines admitted to the mesh."""

from __future__ import annotations

import datetime

import click
from rich.console import Console
from rich.table import Table

from node.cli.common import node_options, print_json, request


def _when(ts) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@click.group(invoke_without_command=True)
@click.pass_context
def nodes(ctx) -> None:
    """Every node ever admitted to the mesh; revoke a lost or retired machine."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_)


@nodes.command("list")
@node_options
def list_(url, key, as_json) -> None:
    """Every node ever admitted: id, name, first and last seen, state."""
    data = request("GET", url, "/mesh/nodes", key=key)["data"]
    if as_json:
        print_json(data)
        return
    t = Table(title="nodes")
    for col in ("id", "name", "first seen", "last seen", "state"):
        t.add_column(col, overflow="fold")
    for n in data:
        state = ("revoked" if n["revoked"] else "this node" if n["self"]
                 else "connected" if n["connected"] else "away")
        t.add_row(n["peer_id"][-12:], n["name"], _when(n["first_seen"]),
                  _when(n["last_seen"]), state)
    Console().print(t)


@nodes.command()
@click.argument("node_ref", metavar="ID")
@node_options
def revoke(node_ref, url, key, as_json) -> None:
    """Revoke a node (peer id, its last 8+ characters, or its name) mesh-wide, for good."""
    out = request("POST", url, f"/mesh/nodes/{node_ref}/revoke", key=key)
    if as_json:
        print_json(out)
    else:
        click.echo(f"revoked {out['name'] or '?'} ({out['peer_id']}): every node drops and "
                   "refuses it")
