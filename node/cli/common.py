"""Helpers the CLI verbs share: talking to a node over HTTP, printing errors."""

from __future__ import annotations

import json
import os
from typing import Any

import click
import httpx

DEFAULT_URL = "http://127.0.0.1:8080"

url_option = click.option("--url", default=lambda: os.environ.get("MESH_URL", DEFAULT_URL),
                          show_default="$MESH_URL or " + DEFAULT_URL,
                          help="The node to talk to.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
key_option = click.option("--key", default=lambda: os.environ.get("MESH_API_KEY"),
                          show_default="$MESH_API_KEY", help="API key (admin for management).")


def node_options(f):
    """--url, --key and --json: what every verb that talks to a node takes."""
    return url_option(key_option(json_option(f)))


def request(method: str, url: str, path: str, *, key: str | None = None,
            timeout: float = 30.0, **kw: Any) -> Any:
    """One call to a node's API; any failure becomes one readable line."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.request(method, url.rstrip("/") + path, headers=headers, timeout=timeout, **kw)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the node at {url}: {exc}") from None
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code >= 400:
        msg = (body or {}).get("error", {}).get("message") if isinstance(body, dict) else None
        raise click.ClickException(f"{r.status_code}: {msg or r.text.strip()[:200]}")
    return body


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))
