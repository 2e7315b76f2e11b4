"""`mesh up`: start a node in the foreground."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import trio

from mesh.errors import MeshError


@click.command()
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="State directory (default $MESH_HOME, else a per-user data dir).")
@click.option("--host", default=None, help="Address the API listens on [127.0.0.1].")
@click.option("--port", type=int, default=None, help="API port [8080]; 0 picks a free one.")
@click.option("--model", "models", multiple=True, help="Model id to serve (repeatable).")
@click.option("--no-models", is_flag=True, default=None, help="Serve no model: a pure entry point.")
@click.option("--models-dir", type=click.Path(path_type=Path), default=None,
              help="Where models are installed [<home>/models].")
@click.option("--name", default=None, help="Node name shown in status [hostname].")
@click.option("--token", default=None, help="Mesh token from `mesh token` (or $MESH_TOKEN).")
@click.option("--p2p-port", type=int, default=None, help="libp2p TCP port [0: any free port].")
@click.option("--peer", "peers", multiple=True, help="Multiaddr of a node to dial (repeatable).")
@click.option("--no-mdns", "no_mdns", is_flag=True, default=False, help="Do not use mDNS discovery.")
@click.option("--gallery", multiple=True, help="Extra gallery index file or URL (repeatable).")
@click.option("--offer-memory", default=None, help="Memory lent to split models, e.g. 6GiB.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def up(home, log_level, no_mdns, **flags) -> None:
    """Start a node: install and load its models, serve the OpenAI API, join the mesh."""
    from node.config import load_config
    from node.daemon import serve_node

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if no_mdns:
        flags["mdns"] = False
    if flags.get("offer_memory") is not None:
        flags["offer_memory"] = parse_size(flags["offer_memory"])
    try:
        config = load_config(home, **flags)
        trio.run(serve_node, config)
    except MeshError as exc:
        raise click.ClickException(exc.message) from None


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'6GiB' -> 6442450944; a readable error for anything else."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if value < 0 or unit not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 6GiB or 512MB", param_hint="--offer-memory")
    return int(value * _UNITS[unit])
