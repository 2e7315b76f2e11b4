"""`mesh agents create|list|show|delete|run|runs|logs`: agents and scheduled jobs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import httpx
import yaml
from rich.console import Console
from rich.table import Table

from node.cli.common import node_options, print_json, request


@click.group()
def agents() -> None:
    """Agents: a model, instructions and tools, run now, on a schedule or by webhook."""


@agents.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--replace", is_flag=True, help="Replace the agent of that name if it exists.")
@node_options
def create(file, replace, url, key, as_json) -> None:
    """Create an agent from a YAML (or JSON) definition file."""
    try:
        spec = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{file}: not valid YAML ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise click.ClickException(f"{file}: expected a mapping with at least name and model")
    if replace and _exists(url, f"/v1/agents/{spec['name']}", key):
        out = request("PUT", url, f"/v1/agents/{spec['name']}", key=key, json=spec)
    else:
        out = request("POST", url, "/v1/agents", key=key, json=spec)
    if as_json:
        print_json(out)
    else:
        click.echo(f"agent {out['name']} rev {out['rev']}; runs on: "
                   f"{', '.join(out.get('runnable_on') or []) or 'no node now'}")


def _exists(url: str, path: str, key: str | None) -> bool:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(url.rstrip("/") + path, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the node at {url}: {exc}") from None
    return r.status_code == 200


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@agents.command("list")
@node_options
def list_(url, key, as_json) -> None:
    """List agents: model, schedule, where they can run, their next tick."""
    data = request("GET", url, "/v1/agents", key=key)["data"]
    if as_json:
        print_json(data)
        return
    t = Table(title="agents")
    for col in ("name", "model", "schedule", "runs on", "next tick"):
        t.add_column(col)
    for a in data:
        d = a.get("definition") or {}
        s = d.get("schedule") or {}
        sched = (f"every {s['every']:g} s" if s.get("every") else s.get("cron")) or "-"
        nxt = (a.get("next_runs") or [{}])[0]
        t.add_row(a["name"], d.get("model", "?"), sched, ", ".join(a.get("runnable_on") or []),
                  f"{_when(nxt.get('at'))} on {(nxt.get('nodes') or ['?'])[0]}" if nxt else "-")
    Console().print(t)


@agents.command()
@click.argument("name")
@node_options
def show(name, url, key, as_json) -> None:
    """One agent's definition and placement."""
    out = request("GET", url, f"/v1/agents/{name}", key=key)
    if as_json:
        print_json(out)
    else:
        click.echo(yaml.safe_dump(out["definition"], sort_keys=False).rstrip())
        click.echo(f"# rev {out['rev']}, owner {out['owner'] or '-'}, runs on: "
                   f"{', '.join(out.get('runnable_on') or []) or 'no node now'}")
        for n in out.get("next_runs") or []:
            click.echo(f"# next {_when(n['at'])}: {' > '.join(n['nodes']) or 'no node'}")


@agents.command()
@click.argument("name")
@node_options
def delete(name, url, key, as_json) -> None:
    """Delete an agent mesh-wide (its runs stay readable on the nodes that made them)."""
    out = request("DELETE", url, f"/v1/agents/{name}", key=key)
    if as_json:
        print_json(out)
    else:
        click.echo(f"deleted {name}")


@agents.command()
@click.argument("name")
@click.option("--input", "text", default="", help="The input of the run.")
@click.option("--wait", is_flag=True, help="Print the steps as they happen, then the output.")
@node_options
def run(name, text, wait, url, key, as_json) -> None:
    """Run an agent now, on the node at --url."""
    if not wait:
        out = request("POST", url, f"/v1/agents/{name}/runs", key=key, json={"input": text})
        if as_json:
            print_json(out)
        else:
            click.echo(out["id"])
        return
    _follow(url, f"/v1/agents/{name}/runs", key, as_json, "POST", {"input": text, "stream": True})


@agents.command()
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@node_options
def runs(name, limit, url, key, as_json) -> None:
    """An agent's recent runs, on every node."""
    out = request("GET", url, f"/v1/agents/{name}/runs?limit={limit}", key=key)
    if as_json:
        print_json(out)
        return
    t = Table(title=f"runs of {name}")
    t.add_column("id", overflow="fold")
    for col in ("trigger", "status", "node", "started", "tokens", "output / error"):
        t.add_column(col)
    for r in out["data"]:
        t.add_row(r["id"], r["trigger"], r["status"], r["node"], _when(r["started_at"]),
                  str(r["usage"]["total_tokens"]), (r["output"] or r["error"] or "")[:60])
    Console().print(t)
    if out.get("unreachable"):
        click.echo(f"(not reached: {', '.join(out['unreachable'])})")


@agents.command()
@click.argument("name")
@click.argument("run_id", required=False)
@click.option("--follow", "-f", is_flag=True, help="Keep printing steps until the run ends.")
@node_options
def logs(name, run_id, follow, url, key, as_json) -> None:
    """A run's steps (the latest run when RUN_ID is left out)."""
    if run_id is None:
        latest = request("GET", url, f"/v1/agents/{name}/runs?limit=1", key=key)["data"]
        if not latest:
            raise click.ClickException(f"agent {name} has no runs yet")
        run_id = latest[0]["id"]
    path = f"/v1/agents/{name}/runs/{run_id}"
    if follow:
        _follow(url, path + "/events", key, as_json, "GET", None)
        return
    steps = request("GET", url, path + "/steps", key=key)["data"]
    final = request("GET", url, path, key=key)
    for ev in steps + [final]:
        _print(ev, as_json)


def _follow(url: str, path: str, key, as_json: bool, method: str, body) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    last = None
    try:
        with httpx.stream(method, url.rstrip("/") + path, json=body, headers=headers,
                          timeout=httpx.Timeout(30, read=None)) as r:
            if r.status_code >= 400:
                r.read()
                msg = (r.json().get("error") or {}).get("message") if r.content else None
                raise click.ClickException(f"{r.status_code}: {msg or r.text[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev and "object" not in ev:
                    raise click.ClickException(ev["error"].get("message", "the stream failed"))
                _print(ev, as_json)
                last = ev
    except httpx.HTTPError as exc:
        raise click.ClickException(f"lost the node at {url}: {exc}") from None
    if last is None or last.get("object") != "agent.run" or last["status"] not in (
            "completed", "incomplete", "failed", "interrupted"):
        raise click.ClickException("the stream ended before the run did")
    if last["status"] != "completed":
        raise click.ClickException(f"run {last['id']} {last['status']}: {last['error']}")


def _print(ev: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(ev))
        return
    if ev.get("object") == "agent.run":
        took = (f" in {ev['ended_at'] - ev['started_at']:.1f} s"
                if ev.get("ended_at") and ev.get("started_at") else "")
        tail = ev["output"] if ev["status"] == "completed" else ev["error"] or ""
        click.echo(f"run {ev['id']} {ev['status']} on {ev['node']}{took}, "
                   f"{ev['usage']['total_tokens']} tokens: {tail or ''}")
        if ev["status"] == "incomplete" and ev.get("output"):
            click.echo(ev["output"])
        return
    n = ev["n"]
    if ev["type"] == "model":
        u = ev["usage"]
        what = ("calls " + ", ".join(f"{c['name']}({c['arguments']})" for c in ev["tool_calls"])
                if ev["tool_calls"] else repr(ev["text"]))
        click.echo(f"[{n}] model on {ev['node']} ({u['prompt_tokens']}+"
                   f"{u['completion_tokens']} tokens): {what}")
    else:
        result = f"REFUSED: {ev['error']}" if ev["refused"] else (
            f"ERROR: {ev['error']}" if ev["error"] else repr(ev["output"][:300]))
        click.echo(f"[{n}] tool {ev['name']}({ev['arguments']}) -> {result}")
