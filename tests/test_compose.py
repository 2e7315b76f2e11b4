"""compose-cluster.yml is valid Compose and runs only commands the CLI has."""

from __future__ import annotations

import json

import click
import pytest
import yaml

from node.cli import cli
from tests.procs import REPO

SCHEMA = REPO.parent / "shared" / "data" / "compose-spec.schema.json"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "compose-cluster.yml").read_text())


def test_compose_file_matches_the_spec(compose):
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} is not here (../shared is beside the repository in CI)")
    jsonschema.validate(compose, json.loads(SCHEMA.read_text()))
    assert len(compose["services"]) == 3
    ports = {s["ports"][0].split(":")[0] for s in compose["services"].values()}
    assert len(ports) == 3, "each node's API needs its own host port"
    volumes = {s["volumes"][0].split(":")[0] for s in compose["services"].values()}
    assert len(volumes) == 3, "each node needs its own home volume"
    for s in compose["services"].values():
        assert s["env_file"] == ["mesh.env"]
        assert "--peer" in s["command"]


def test_compose_commands_exist_in_the_cli(compose):
    dockerfile = (REPO / "Dockerfile").read_text()
    default_cmd = json.loads(dockerfile.split("\nCMD ", 1)[1].splitlines()[0])
    for argv in [default_cmd] + [s["command"] for s in compose["services"].values()]:
        ctx = cli.make_context("mesh", list(argv))
        name, cmd, rest = cli.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
        assert cmd is not None, argv
        try:
            cmd.make_context(name, list(rest), parent=ctx)
        except click.UsageError as exc:
            pytest.fail(f"{argv}: {exc}")
