"""`mesh doctor`: check what usually breaks a mesh, and print a fix for each problem.

Checks, in order (each ok | warn | FAIL | skip, with a fix line when not ok):

  node           the node at --url answers /health, and its /mesh/status (admin key)
  token          the token here (--token, $MESH_TOKEN or <home>/token) is the node's
                 mesh (same mesh id), and the node refused no connection made with another
                 token (its `denied` count: pnet key or admission MAC mismatches)
  p2p port       every node's advertised libp2p address takes a TCP connection from this
                 machine (2 s each)
  mdns           an mDNS query for the mesh's service (_p2p-<mesh id>._udp.local.) finds
                 its nodes within --mdns-wait seconds; none: multicast is blocked or the
                 nodes run with --no-mdns
  clock          each node's clock (its HTTP Date header, 1 s resolution) against this
                 machine's: key revocations are ordered by time
  memory         free RAM (and VRAM) of every node, from its gossiped state
  rpc isolation  whether the llama.cpp RPC servers that nodes lend are closed to other
                 local processes (each lender gossips it: "netns", its own network
                 namespace, or "none: <why>"); a warning for each open one

Exit status 1 when a check failed, 0 otherwise (warnings included).
"""

from __future__ import annotations

import email.utils
import os
import shutil
import socket
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import httpx

from mesh.errors import BadRequest
from mesh.token import load_token, parse_token
from node.cli.common import node_options, print_json

CLOCK_WARN_S = 5.0       # Date headers have 1 s resolution; beyond this, clocks differ
RAM_FAIL, RAM_WARN = 0.05, 0.15     # free fraction
P2P_TIMEOUT_S = 2.0


@dataclass
class Finding:
    check: str
    status: str          # ok | warn | fail | skip
    detail: str
    fix: str = ""


def _get(url: str, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url.rstrip("/") + path, headers=headers, timeout=10)


def _local_token(token: str | None, home: Path | None):
    """(Token | None, where it came from, the error reading it | None)."""
    from node.config import default_home
    if token:
        where = "--token"
    elif os.environ.get("MESH_TOKEN"):
        token, where = os.environ["MESH_TOKEN"], "$MESH_TOKEN"
    else:
        where = f"{home or default_home()}/token"
    try:
        return (parse_token(token) if token else load_token(home or default_home())), where, None
    except (BadRequest, OSError) as exc:
        return None, where, getattr(exc, "message", None) or str(exc)


def check_token(status: dict, token: str | None, home: Path | None) -> list[Finding]:
    out = []
    mesh = status.get("mesh")
    local, where, error = _local_token(token, home)
    if error:
        out.append(Finding("token", "fail", f"the token here ({where}) is not valid: {error}",
                           "copy it again, whole, from `mesh token` (or the first node's config)"))
    elif mesh is None:
        out.append(Finding("token", "warn", "the node runs alone: it was started without a token",
                           "make one with `mesh token` and start every node with --token TOKEN "
                           "(or $MESH_TOKEN)"))
    elif local is None:
        out.append(Finding("token", "ok", f"the node is in mesh {mesh} (no token here to compare; "
                           "pass --token)"))
    elif local.mesh_id != mesh:
        out.append(Finding("token", "fail", f"token mismatch: the token here ({where}) is mesh "
                           f"{local.mesh_id}, the node is in mesh {mesh}",
                           "use the same token on every node: copy it from the node's "
                           "machine (`<home>/token`) or start them all with one `mesh token`"))
    else:
        out.append(Finding("token", "ok", f"the token here ({where}) is the node's mesh {mesh}"))
    denied = (status.get("self") or {}).get("denied") or 0
    if denied:
        out.append(Finding("token", "fail", f"the node refused {denied} connection"
                           f"{'s' if denied != 1 else ''} made with another token since it started: a machine "
                           "trying to join has a different (or old) token",
                           "give that machine this mesh's token (`mesh up --token ...`)"))
    return out


def _tcp_target(addr: str) -> tuple[str, int] | None:
    parts = addr.split("/")
    try:
        if parts[1] in ("ip4", "ip6", "dns4", "dns6", "dns") and parts[3] == "tcp":
            return parts[2], int(parts[4])
    except (IndexError, ValueError):
        return None
    return None


def check_p2p(status: dict) -> list[Finding]:
    out = []
    for n in status.get("nodes", []):
        targets = [t for t in (_tcp_target(a) for a in n.get("addrs") or []) if t]
        if not targets:
            continue
        bad = []
        for host, port in targets:
            try:
                socket.create_connection((host, port), timeout=P2P_TIMEOUT_S).close()
            except OSError as exc:
                bad.append(f"{host}:{port} ({exc.strerror or type(exc).__name__})")
        if not bad:
            out.append(Finding("p2p port", "ok", f"{n['name']}: {', '.join(f'{h}:{p}' for h, p in targets)}"
                               " takes connections from here"))
        else:
            ports = sorted({p for _, p in targets})
            out.append(Finding("p2p port", "fail" if len(bad) == len(targets) else "warn",
                               f"{n['name']}: unreachable from here: {', '.join(bad)}",
                               f"on {n['name']}, open TCP port {', '.join(map(str, ports))} in its "
                               "firewall (e.g. `ufw allow PORT/tcp`), or restart it with a fixed "
                               "--p2p-port and open that one"))
        if n.get("state") == "suspect":
            out.append(Finding("p2p port", "warn", f"{n['name']} is suspect: its gossip stopped "
                               "arriving", f"check that {n['name']} runs and that its p2p port "
                               "is reachable from the other nodes"))
    return out


def check_mdns(status: dict, wait_s: float) -> list[Finding]:
    mesh = status.get("mesh")
    if not mesh:
        return [Finding("mdns", "skip", "no mesh: nothing to discover")]
    from zeroconf import IPVersion, ServiceBrowser, Zeroconf
    stype = f"_p2p-{mesh}._udp.local."
    found: set[str] = set()

    class Listener:
        def add_service(self, zc, type_, name):
            found.add(name.split(".", 1)[0])
        update_service = add_service

        def remove_service(self, zc, type_, name):
            pass

    try:
        zc = Zeroconf(ip_version=IPVersion.V4Only)
    except OSError as exc:
        return [Finding("mdns", "fail", f"cannot open an mDNS socket here: {exc}",
                        "allow UDP 5353 multicast (224.0.0.251), or join with --peer ADDRESS")]
    try:
        ServiceBrowser(zc, stype, Listener())
        time.sleep(wait_s)
    finally:
        zc.close()
    names = {n.get("id"): n["name"] for n in status.get("nodes", [])}
    seen = sorted(names.get(pid, f"…{pid[-8:]} (not in the node's view)") for pid in found)
    if seen:
        out = [Finding("mdns", "ok", f"mDNS finds {len(seen)} node{'s' if len(seen) != 1 else ''} "
                       f"of mesh {mesh}: {', '.join(seen)}")]
        if any(pid not in names for pid in found):
            out.append(Finding("mdns", "warn", "a node announced on mDNS is not in the node's "
                               "view: the node runs with --no-mdns, or cannot dial it",
                               "start the node without --no-mdns, or give it --peer ADDRESS"))
        return out
    return [Finding("mdns", "warn", f"no mDNS answer for mesh {mesh} in {wait_s:g} s: multicast "
                    "is blocked here (Wi-Fi client isolation, Docker's bridge network, a firewall "
                    "dropping UDP 5353), or the nodes run with --no-mdns",
                    "start nodes with --peer ADDRESS (`mesh status --wide` lists addresses), or "
                    "allow UDP 5353 multicast to 224.0.0.251")]


def _skew(api: str) -> float | None:
    t0 = time.time()
    r = httpx.get(api.rstrip("/") + "/health", timeout=5)
    t1 = time.time()
    date = r.headers.get("date")
    if not date:
        return None
    return email.utils.parsedate_to_datetime(date).timestamp() - (t0 + t1) / 2


def check_clock(status: dict) -> list[Finding]:
    out, far, unknown = [], [], []
    for n in status.get("nodes", []):
        if not n.get("api"):
            continue
        try:
            skew = _skew(n["api"])
        except httpx.HTTPError:
            skew = None
        if skew is None:
            unknown.append(n["name"])
        elif abs(skew) > CLOCK_WARN_S:
            far.append(f"{n['name']} {skew:+.0f} s")
    if far:
        out.append(Finding("clock", "warn", f"clocks differ from this machine's: {', '.join(far)}",
                           "turn on time sync on those machines (`timedatectl set-ntp true`, "
                           "or chrony/ntpd)"))
    else:
        out.append(Finding("clock", "ok", f"every node reachable from here is within "
                           f"{CLOCK_WARN_S:g} s of this machine's clock"))
    if unknown:
        out.append(Finding("clock", "skip", f"could not read the clock of {', '.join(unknown)} "
                           "(API not reachable from here)"))
    return out


def check_memory(status: dict) -> list[Finding]:
    out = []
    for n in status.get("nodes", []):
        mem = n.get("memory") or {}
        for kind in ("ram", "vram"):
            total, free = mem.get(f"{kind}_total") or 0, mem.get(f"{kind}_free") or 0
            if not total:
                continue
            share = free / total
            text = f"{n['name']}: {free / 2**30:.1f} GiB {kind.upper()} free of {total / 2**30:.1f} GiB"
            if share < RAM_WARN:
                out.append(Finding("memory", "fail" if share < RAM_FAIL else "warn", text,
                                   f"on {n['name']}: unload a model (`mesh unload ID`), lower its "
                                   "context_size, or split big models over peers that lend "
                                   "memory (--offer-memory)"))
            else:
                out.append(Finding("memory", "ok", text))
    return out


def check_rpc(status: dict) -> list[Finding]:
    lenders = [n for n in status.get("nodes", []) if (n.get("rpc") or {}).get("offered")]
    if not lenders:
        return [Finding("rpc isolation", "ok", "no node lends memory now")]
    how = [(n["name"], str(n["rpc"].get("isolation") or "not reported (an older node)")) for n in lenders]
    open_ = [name for name, h in how if h != "netns"]
    text = "RPC servers: " + ", ".join(f"{name}: {h}" for name, h in how)
    if not open_:
        return [Finding("rpc isolation", "ok", text)]
    return [Finding("rpc isolation", "warn", text,
                    f"{', '.join(open_)}: the RPC server is on the host's loopback, where any "
                    "local user can reach it (llama.cpp's RPC has no authentication); lend memory "
                    "there only if every local user is trusted, or allow network namespaces "
                    "(root, or user.max_user_namespaces > 0)")]


def diagnose(url: str, key: str | None, token: str | None, home: Path | None,
             mdns_wait: float) -> tuple[list[Finding], dict | None]:
    try:
        health = _get(url, "/health", key)
    except httpx.HTTPError as exc:
        return [Finding("node", "fail", f"cannot reach the node at {url}: {exc}",
                        "start it with `mesh up`, or aim at a running one with --url")], None
    if health.status_code != 200:
        return [Finding("node", "fail", f"{url}/health answered {health.status_code}",
                        "is --url a node's API address (printed as `mesh: api ...`)?")], None
    r = _get(url, "/mesh/status", key)
    if r.status_code in (401, 403):
        msg = r.json().get("error", {}).get("message", r.text) if r.headers.get(
            "content-type", "").startswith("application/json") else r.text
        return [Finding("node", "fail", f"the node's status needs an admin key: {msg}",
                        "pass --key (or $MESH_API_KEY) with an admin key")], None
    if r.status_code != 200:
        return [Finding("node", "fail", f"{url}/mesh/status answered {r.status_code}: "
                        f"{r.text.strip()[:200]}", "see the node's log")], None
    status = r.json()
    me = status["nodes"][0] if status.get("nodes") else {}
    found = [Finding("node", "ok", f"{me.get('name')} answers at {url} (version {me.get('version')})")]
    found += check_token(status, token, home)
    found += check_p2p(status)
    found += check_mdns(status, mdns_wait)
    found += check_clock(status)
    found += check_memory(status)
    found += check_rpc(status)
    return found, status


@click.command()
@node_options
@click.option("--token", default=None, help="The mesh token to compare [$MESH_TOKEN, <home>/token].")
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="Where to find a stored token [$MESH_HOME].")
@click.option("--mdns-wait", type=click.FloatRange(0.1, 30), default=3.0, show_default=True,
              help="Seconds to listen for mDNS answers.")
def doctor(url, key, as_json, token, home, mdns_wait) -> None:
    """Check what usually breaks a mesh (token, ports, mDNS, clocks, memory, RPC) and how to fix it."""
    found, status = diagnose(url, key, token, home, mdns_wait)
    failed = sum(f.status == "fail" for f in found)
    if as_json:
        print_json({"url": url, "mesh": status.get("mesh") if status else None,
                    "checks": [asdict(f) for f in found], "failed": failed})
    else:
        label = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip"}
        color = {"ok": "green", "warn": "yellow", "fail": "red", "skip": None}
        width = max(60, shutil.get_terminal_size().columns)
        wrap = textwrap.TextWrapper(width=width, subsequent_indent=" " * 21)
        for f in found:
            line = wrap.fill(f"{label[f.status]:<5} {f.check:<14} {f.detail}")
            click.echo(click.style(line[:5], fg=color[f.status], bold=f.status == "fail") + line[5:])
            if f.fix:
                click.echo(wrap.fill(f"{'':<20} fix: {f.fix}"))
        warns = sum(f.status == "warn" for f in found)
        click.echo(f"{sum(f.status == 'ok' for f in found)} ok, {warns} warning"
                   f"{'s' if warns != 1 else ''}, {failed} failed")
    if failed:
        raise SystemExit(1)
