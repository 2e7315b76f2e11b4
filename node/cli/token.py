"""`mesh token`: print a new mesh token."""

from __future__ import annotations

import click


@click.command()
def token() -> None:
    """Print a new token; start every node of one mesh with it (--token or $MESH_TOKEN)."""
    from mesh.token import new_token
    click.echo(new_token())
