"""`mesh batches list|show|cancel|download`: the Batch API's batches, from the terminal.

    mesh batches list                      this node's batches, newest first
    mesh batches show ID [--follow]        status, counts and a progress bar (until it ends)
    mesh batches cancel ID
    mesh batches download ID [-o FILE] [--errors]   the output (or error) file's lines

Any node answers for any batch (the id names the node that runs it). Submitting is the
OpenAI client's job (files.create + batches.create); docs/batches.md shows it.
"""

from __future__ import annotations

import datetime
import sys
import time

import click
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from node.cli.common import node_options, print_json, request

DONE = ("completed", "failed", "expired", "cancelled")
FOLLOW_POLL_S = 1.0


@click.group()
def batches() -> None:
    """Batches of the Batch API (/v1/batches): list, follow, cancel, download."""


def _when(ts) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _counts(b: dict) -> str:
    c = b["request_counts"]
    return f"{c['completed'] + c['failed']}/{c['total']} ({c['failed']} failed)"


@batches.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100))
@node_options
def list_(limit, url, key, as_json) -> None:
    """This node's batches, newest first."""
    data = request("GET", url, "/v1/batches", key=key, params={"limit": limit})["data"]
    if as_json:
        print_json(data)
        return
    t = Table(title="batches")
    for col in ("id", "status", "endpoint", "done", "created"):
        t.add_column(col, overflow="fold")
    for b in data:
        t.add_row(b["id"], b["status"], b["endpoint"], _counts(b), _when(b["created_at"]))
    Console().print(t)


@batches.command()
@click.argument("batch_id")
@click.option("--follow", is_flag=True, help="Show progress until the batch ends.")
@node_options
def show(batch_id, follow, url, key, as_json) -> None:
    """A batch's status and counts; --follow draws a progress bar until it ends."""
    b = request("GET", url, f"/v1/batches/{batch_id}", key=key)
    if as_json and not follow:
        print_json(b)
        return
    if follow and b["status"] not in DONE:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=Console(stderr=as_json)) as bar:
            task = bar.add_task(b["status"], total=b["request_counts"]["total"] or None)
            while b["status"] not in DONE:
                c = b["request_counts"]
                bar.update(task, description=b["status"], total=c["total"] or None,
                           completed=c["completed"] + c["failed"])
                time.sleep(FOLLOW_POLL_S)
                b = request("GET", url, f"/v1/batches/{batch_id}", key=key)
            c = b["request_counts"]
            bar.update(task, description=b["status"], total=c["total"] or 1,
                       completed=c["completed"] + c["failed"])
    if as_json:
        print_json(b)
        return
    click.echo(f"{b['id']}: {b['status']}, {_counts(b)}, endpoint {b['endpoint']}")
    for name in ("input_file_id", "output_file_id", "error_file_id"):
        if b.get(name):
            click.echo(f"  {name}: {b[name]}")
    for e in (b.get("errors") or {}).get("data") or []:
        where = f"line {e['line']}: " if e.get("line") else ""
        click.echo(f"  error: {where}{e['message']} ({e['code']})")


@batches.command()
@click.argument("batch_id")
@node_options
def cancel(batch_id, url, key, as_json) -> None:
    """Cancel a batch: lines in flight stop, finished lines are kept."""
    b = request("POST", url, f"/v1/batches/{batch_id}/cancel", key=key)
    if as_json:
        print_json(b)
    else:
        click.echo(f"{b['id']}: {b['status']}")


@batches.command()
@click.argument("batch_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file instead of standard output.")
@click.option("--errors", is_flag=True, help="The error file instead of the output file.")
@node_options
def download(batch_id, output, errors, url, key, as_json) -> None:
    """The output (or --errors: error) file of a batch, as JSON lines."""
    b = request("GET", url, f"/v1/batches/{batch_id}", key=key)
    fid = b["error_file_id" if errors else "output_file_id"]
    if not fid:
        raise click.ClickException(f"batch {batch_id} ({b['status']}) has no "
                                   f"{'error' if errors else 'output'} file")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(url.rstrip("/") + f"/v1/files/{fid}/content", headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the node at {url}: {exc}") from None
    if r.status_code >= 400:
        raise click.ClickException(f"{r.status_code}: {r.text.strip()[:200]}")
    if output:
        with open(output, "wb") as f:
            f.write(r.content)
        click.echo(f"wrote {len(r.content)} bytes to {output}", err=True)
    else:
        sys.stdout.buffer.write(r.content)
