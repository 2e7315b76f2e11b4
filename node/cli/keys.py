"""`mesh keys create|list|revoke`: API keys valid on every node of the mesh."""

from __future__ import annotations

import datetime

import click
from rich.console import Console
from rich.table import Table

from node.cli.common import node_options, print_json, request


@click.group()
def keys() -> None:
    """Manage the mesh's API keys (an admin key once any key exists)."""


@keys.command()
@click.option("--name", required=True, help="A name to recognise the key by.")
@click.option("--features", required=True,
              help="Comma-separated: chat,completions,embeddings,audio,models,batch,agents,admin.")
@node_options
def create(name, features, url, key, as_json) -> None:
    """Create a key; it is printed once, as the last word of the last line."""
    out = request("POST", url, "/mesh/keys", key=key,
                  json={"name": name, "features": [f for f in features.split(",") if f.strip()]})
    if as_json:
        print_json(out)
        return
    click.echo(f"created key {out['name']!r} with features {','.join(out['features'])}; "
               "it is shown only now.")
    click.echo(f"key: {out['key']}")


def _when(ts) -> str:
    if not ts:
        return "never"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@keys.command("list")
@node_options
def list_(url, key, as_json) -> None:
    """List keys: names, features, created, last used here (never the secret)."""
    data = request("GET", url, "/mesh/keys", key=key)["data"]
    if as_json:
        print_json(data)
        return
    t = Table(title="API keys")
    for col in ("name", "features", "created", "last used (this node)", "state"):
        t.add_column(col)
    for k in data:
        t.add_row(k["name"], ",".join(k["features"]), _when(k["created"]), _when(k["last_used"]),
                  "revoked" if k["revoked"] else "live")
    Console().print(t)


@keys.command()
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Revoke even the last live key (the mesh is then open to anyone).")
@node_options
def revoke(name, force, url, key, as_json) -> None:
    """Revoke a key mesh-wide."""
    out = request("DELETE", url, f"/mesh/keys/{name}", key=key,
                  params={"force": "true"} if force else None)
    if as_json:
        print_json(out)
    else:
        click.echo(f"revoked {name}")
