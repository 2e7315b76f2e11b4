"""`mesh chat [MODEL]`: an interactive, streaming chat in the terminal against any node.

Each line read is a user turn; the answer streams as it is generated, then one dim line
says which node served it (`x-mesh-node`), the tokens and the time. The conversation is
kept for the session. `/reset` starts over, `/system TEXT` sets the system prompt,
`/exit` (or end of input) quits; Ctrl-C stops an answer in progress. Without MODEL the
first chat model the mesh lists is used. Input need not be a terminal: lines piped in
are turns, so a script can hold a conversation too.
"""

from __future__ import annotations

import json
import sys
import time

import click
import httpx

from node.cli.common import key_option, request, url_option

HELP = "/reset starts over, /system TEXT sets the system prompt, /exit quits"


def _pick_model(url: str, key: str | None) -> str:
    """The first chat model the mesh lists (a model named on the command line is taken as
    given: aliases resolve on the node, and a wrong name gets the node's own 404)."""
    cards = request("GET", url, "/v1/models", key=key)["data"]
    chat = [c["id"] for c in cards if "chat" in (c.get("capabilities") or [])]
    if not chat:
        raise click.ClickException("no chat model is loaded on any node of the mesh "
                                   "(mesh load MODEL, or mesh install MODEL --load)")
    return chat[0]


def _answer(url: str, key: str | None, body: dict) -> tuple[str, str]:
    """Stream one answer to stdout; (its text, the line about it)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    parts: list[str] = []
    usage, t0 = None, time.monotonic()
    try:
        with httpx.stream("POST", url.rstrip("/") + "/v1/chat/completions", json=body,
                          headers=headers, timeout=httpx.Timeout(30, read=None)) as r:
            if r.status_code >= 400:
                r.read()
                try:
                    msg = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    msg = r.text.strip()[:200]
                raise click.ClickException(f"{r.status_code}: {msg}")
            node = r.headers.get("x-mesh-node", "?")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("error"):
                    raise click.ClickException(f"the answer broke off: {ev['error'].get('message')}")
                usage = ev.get("usage") or usage
                for ch in ev.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content")
                    if text:
                        parts.append(text)
                        click.echo(text, nl=False)
                        sys.stdout.flush()
    except httpx.HTTPError as exc:
        raise click.ClickException(f"lost the node at {url}: {exc}") from None
    took = time.monotonic() - t0
    tokens = f"{usage['completion_tokens']} tokens, " if usage else ""
    return "".join(parts), f"[served by {node} · {tokens}{took:.1f} s]"


@click.command()
@click.argument("model", required=False)
@url_option
@key_option
@click.option("--system", default="", help="System prompt.")
@click.option("--temperature", type=click.FloatRange(0, 2), default=None, help="Sampling temperature.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True,
              help="Longest answer, in tokens.")
def chat(model, url, key, system, temperature, max_tokens) -> None:
    """Chat with a model of the mesh in the terminal, answers streamed as generated."""
    model = model or _pick_model(url, key)
    interactive = sys.stdin.isatty()
    click.echo(click.style(f"chatting with {model} through {url} ({HELP})", dim=True), err=True)
    history: list[dict] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            click.echo(click.style("(a new conversation)", dim=True), err=True)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip()
            click.echo(click.style(f"(system prompt: {system or 'none'})", dim=True), err=True)
            continue
        if line.startswith("/"):
            click.echo(click.style(f"unknown command {line.split()[0]!r}: {HELP}", fg="red"), err=True)
            continue
        history.append({"role": "user", "content": line})
        body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": max_tokens,
                "messages": ([{"role": "system", "content": system}] if system else []) + history}
        if temperature is not None:
            body["temperature"] = temperature
        try:
            text, about = _answer(url, key, body)
        except click.ClickException as exc:
            click.echo("")
            click.echo(click.style(f"error: {exc.message}", fg="red"), err=True)
            history.pop()
            if not interactive:
                raise SystemExit(1)
            continue
        except KeyboardInterrupt:
            click.echo(click.style(" (stopped)", dim=True))
            history.pop()
            continue
        history.append({"role": "assistant", "content": text})
        click.echo("")
        click.echo(click.style(about, dim=True))
