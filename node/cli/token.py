"""`mesh token`: print a new mesh token; `mesh token rotate`: replace the running mesh's."""

from __future__ import annotations

import datetime

import click

from node.cli.common import node_options, print_json, request


@click.group(invoke_without_command=True)
@click.pass_context
def token(ctx) -> None:
    """Print a new token; start every node of one mesh with it (--token or $MESH_TOKEN)."""
    if ctx.invoked_subcommand is None:
        from mesh.token import new_token
        click.echo(new_token())


@token.command()
@click.option("--grace", "grace_s", type=float, default=300.0, show_default=True,
              help="seconds the old token is still accepted")
@node_options
def rotate(grace_s, url, key, as_json) -> None:
    """Give every alive node a new token; the old one stops working after --grace.

    Revoke a lost machine first (`mesh nodes revoke`), then rotate: a machine that kept
    only the old token cannot come back, even with a fresh identity. Nodes restarted with
    their old --token use the new one (stored in their home). The new token is printed
    once, last: start machines that join after the grace period with it (during it
    the mesh still signs with the old token)."""
    out = request("POST", url, "/mesh/token/rotate", key=key, json={"grace_s": grace_s})
    if as_json:
        print_json(out)
        return
    when = datetime.datetime.fromtimestamp(out["retire_at"]).strftime("%H:%M:%S")
    got = ", ".join(p["name"] or p["peer_id"][-8:] for p in out["delivered"]) or "none"
    click.echo(f"mesh {out['mesh']}: handed to {len(out['delivered'])} node(s) ({got}); "
               f"the old token stops working at {when} ({out['grace_s']:g} s)")
    for p in out["missed"]:
        click.echo(f"not reached: {p['name'] or p['peer_id'][-8:]}: {p['error']} (start it with "
                   "the new token)", err=True)
    click.echo(out["token"])
