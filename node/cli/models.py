"""Model verbs: `mesh gallery`, `install`, `models`, `load`, `unload`, `remove`."""

from __future__ import annotations

import json

import click
import httpx
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from node.cli.common import node_options, print_json, request


def _no_node(url: str) -> bool:
    """Nothing listens at `url` (as opposed to a node that answers with an error)."""
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5)
    except httpx.TransportError:
        return True
    return False


@click.command()
@node_options
def gallery(url, key, as_json) -> None:
    """List the models the gallery can install (the built-in index when no node runs)."""
    if _no_node(url):
        from gallery.catalog import load_index
        data = sorted(({**e.model_dump(mode="json"), "installed": None} for e in load_index().values()),
                      key=lambda e: e["id"])
        click.echo(f"no node at {url}: this is the built-in index (gallery/index.yaml), without "
                   "a node's --gallery additions or what it has installed", err=True)
    else:
        data = request("GET", url, "/mesh/gallery", key=key)["data"]
    if as_json:
        print_json(data)
        return
    t = Table(title="gallery")
    for col in ("id", "backend", "size", "installed", "description"):
        t.add_column(col)
    for e in data:
        size = sum(f.get("size") or 0 for f in e["files"])
        t.add_row(e["id"], e["backend"], f"{size / 1e6:.0f} MB" if size else "?",
                  {True: "yes", False: "", None: "?"}[e["installed"]], e.get("description") or "")
    Console().print(t)


def _follow(url: str, key: str | None, job: dict, quiet: bool) -> dict:
    """Follow a job's SSE events with a progress bar; return its last state."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    last = job
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), disable=quiet, transient=True) as bar:
        task = bar.add_task(job["model"], total=None)
        try:
            with httpx.stream("GET", f"{url.rstrip('/')}/mesh/jobs/{job['id']}/events",
                              headers=headers, timeout=httpx.Timeout(30, read=None)) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    last = json.loads(line[6:])
                    bar.update(task, completed=last["bytes_done"], total=last["bytes_total"],
                               description=f"{last['model']} {last['state']} "
                                           f"{last.get('file') or ''}".strip())
        except httpx.HTTPError as exc:
            raise click.ClickException(f"lost the node at {url}: {exc}") from None
    return last


@click.command()
@click.argument("model_id")
@click.option("--load", is_flag=True, help="Load it once installed.")
@node_options
def install(model_id, load, url, key, as_json) -> None:
    """Install a model from the gallery onto the node, with a progress bar."""
    job = request("POST", url, "/mesh/models/install", key=key, json={"id": model_id, "load": load})
    last = _follow(url, key, job, quiet=as_json)
    if as_json:
        print_json(last)
    if last["state"] != "done":
        raise click.ClickException(f"install of {model_id} failed: {last.get('error')}")
    if not as_json:
        came = f" from {last['source']}" if last.get("source") else ""
        click.echo(f"installed {last['model']}{came}" + (" and loaded it" if load else ""))


@click.command()
@node_options
def models(url, key, as_json) -> None:
    """List models installed and loaded on the node, and served across the mesh."""
    data = request("GET", url, "/mesh/models", key=key)
    if as_json:
        print_json(data)
        return
    loaded = {m["id"]: m for m in data["loaded"]}
    t = Table(title="installed here")
    for col in ("id", "backend", "size", "state"):
        t.add_column(col)
    for m in data["installed"]:
        t.add_row(m["id"], m["backend"], f"{m['size_bytes'] / 1e6:.0f} MB",
                  loaded.get(m["id"], {}).get("state", "installed"))
    mesh = Table(title="served in the mesh")
    mesh.add_column("model")
    mesh.add_column("nodes")
    for m in data["mesh"]:
        mesh.add_row(m["id"], ", ".join(m["nodes"]))
    c = Console()
    c.print(t)
    c.print(mesh)


@click.command()
@click.argument("model_id")
@click.option("--split", is_flag=True, help="Spread it over peers that lend memory.")
@click.option("--force", is_flag=True,
              help="With --split: split even a model that fits here (it will be slower).")
@node_options
def load(model_id, split, force, url, key, as_json) -> None:
    """Load an installed model on the node."""
    if force and not split:
        raise click.UsageError("--force only applies with --split")
    m = request("POST", url, "/mesh/models/load", key=key, timeout=900,
                json={"id": model_id, "split": split, "force": force})
    if as_json:
        print_json(m)
    elif m.get("split"):
        sp = m["split"]
        parts = ", ".join(f"{n} {k} layers" for n, k in zip(sp["nodes"], sp["layers"]))
        click.echo(f"loaded {m['id']} split over {parts} (pid {m.get('pid')})")
    else:
        click.echo(f"loaded {m['id']} (pid {m.get('pid')})")


@click.command()
@click.argument("model_id")
@node_options
def unload(model_id, url, key, as_json) -> None:
    """Unload a model (its worker process stops)."""
    m = request("POST", url, "/mesh/models/unload", key=key, json={"id": model_id})
    print_json(m) if as_json else click.echo(f"unloaded {m['id']}")


@click.command()
@click.argument("model_id")
@node_options
def remove(model_id, url, key, as_json) -> None:
    """Delete an installed model's files from the node."""
    m = request("DELETE", url, f"/mesh/models/{model_id}", key=key)
    print_json(m) if as_json else click.echo(f"removed {m['id']}")
