"""The `mesh` command: a click group with one small module per verb.

Every verb that talks to a node takes `--url` (default $MESH_URL or
http://127.0.0.1:8080) and `--json` where a script reads its output. User-facing
failures are one readable line (click.ClickException), never a traceback.
"""

from __future__ import annotations

import sys

import click

from node.cli import agents as _agents
from node.cli import batches as _batches
from node.cli import chat as _chat
from node.cli import doctor as _doctor
from node.cli import keys as _keys
from node.cli import models as _models
from node.cli import nodes as _nodes
from node.cli import up as _up
from node.cli import status as _status
from node.cli import token as _token


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inference-mesh", prog_name="mesh")
def cli() -> None:
    """inference-mesh: a peer-to-peer inference mesh with an OpenAI-compatible API."""


for command in (_up.up, _status.status, _token.token, _models.gallery, _models.install,
                _models.models, _models.load, _models.unload, _models.remove, _keys.keys,
                _batches.batches, _nodes.nodes, _chat.chat, _doctor.doctor):
    cli.add_command(command)
cli.add_command(_agents.agents)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
