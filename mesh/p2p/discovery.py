"""Finding peers: static ``--peer`` addresses and mDNS on the LAN.

Static peers are first-class (exo users lose discovery wherever multicast is blocked:
Wi-Fi isolation, Docker, headless boxes). Each static address gets its own task that
dials it, waits while the peer is connected, and re-dials when it is not, forever: at
once after a connection that lasted ``STABLE_AFTER``, otherwise with exponential backoff
from ``BACKOFF_START`` to ``BACKOFF_MAX`` (+-20% jitter so a restarted mesh does not dial
in lockstep). An address may omit ``/p2p/<id>``: the id is
learned from the Noise handshake (mesh/p2p/host.py ``connect_addr``). An address that turns
out to be this node (a token's bootstrap list names its creator) ends its task.

mDNS uses zeroconf directly rather than py-libp2p's ``enable_mDNS``: py-libp2p can name
a private service type, but it reports finds through a process-global singleton
(``peerDiscovery``), so every host in a process sees every mesh's finds, and it
registers the service synchronously in the trio thread (~1.6 s blocked at startup).
Here each mesh gets its own zeroconf instance, registration runs in a worker thread,
and finds travel to trio through a memory channel (``trio.from_thread``).

- Service type ``_p2p-<mesh_id>._udp.local.``: the libp2p convention for private
  networks; meshes with different tokens never see each other.
- Instance name = our peer id; TXT records ``dnsaddr=<multiaddr>/p2p/<id>`` as in the
  libp2p mDNS spec, so other libp2p tooling can read them.
- mDNS only finds peers; liveness comes from gossip (a killed node's record lingers:
  zeroconf forces the PTR TTL to 1125 s).
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from mesh.errors import AdmissionDenied, MeshError
from mesh.p2p.host import SelfDial

__all__ = ["BACKOFF_START", "BACKOFF_MAX", "DIAL_TIMEOUT", "serve_static_peer", "open_mdns", "mdns_service_type"]

log = logging.getLogger(__name__)

BACKOFF_START = 0.25     # s
BACKOFF_MAX = 5.0        # s; brief: re-dial static peers forever, backoff capped ~5 s
DIAL_TIMEOUT = 5.0       # s; a LAN dial + handshake takes ~20 ms
STABLE_AFTER = 2.0       # s; a connection that lasted less is "flapping" and re-dialed with backoff
MDNS_QUERY_TIMEOUT_MS = 3000


def _jitter(delay: float) -> float:
    return delay * random.uniform(0.8, 1.2)


async def serve_static_peer(
    addr: str,
    *,
    connect: Callable[[str], Awaitable[str]],
    is_connected: Callable[[str], bool],
    changed: Callable[[], trio.Event],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep a connection to ``addr`` forever.

    ``connect(addr) -> peer id`` dials (raising MeshError on failure), ``is_connected``
    tells whether a peer id has a live connection, and ``changed()`` returns an event
    that is set at the next connect/disconnect anywhere.
    """
    task_status.started()
    peer: str | None = None
    delay = BACKOFF_START
    warned = False
    while True:
        if peer is not None and is_connected(peer):
            since = trio.current_time()
            while is_connected(peer):
                await changed().wait()
            if trio.current_time() - since >= STABLE_AFTER:
                delay = BACKOFF_START  # an outage after a good run: re-dial at once
                continue
            # Dropped right after it was made: fall through to the backoff, never spin.
        else:
            try:
                with trio.fail_after(DIAL_TIMEOUT):
                    peer = await connect(addr)
                if warned:
                    log.info("static peer %s is reachable again", addr)
                warned = False
                continue
            except SelfDial:
                log.debug("static peer %s is this node; not dialing it", addr)
                return
            except (MeshError, trio.TooSlowError) as exc:
                reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                if not warned:
                    level = logging.WARNING if isinstance(exc, AdmissionDenied) else logging.INFO
                    log.log(level, "static peer %s: %s; retrying every <= %.0f s", addr, reason, BACKOFF_MAX)
                    warned = True
        await trio.sleep(_jitter(delay))
        delay = min(delay * 2, BACKOFF_MAX)


def mdns_service_type(mesh_id: str) -> str:
    return f"_p2p-{mesh_id}._udp.local."


def _txt(peer_id: str, addrs: Sequence[str]) -> dict[bytes, bytes]:
    props: dict[bytes, bytes] = {}
    for i, a in enumerate(addrs):
        a = a if a.endswith(f"/p2p/{peer_id}") else f"{a}/p2p/{peer_id}"
        props[b"dnsaddr" if i == 0 else f"dnsaddr{i + 1}".encode()] = a.encode()
    return props


def _parse_info(info: Any) -> tuple[str, list[str]] | None:
    peer: str | None = None
    addrs: list[str] = []
    for key, value in (info.properties or {}).items():
        if not key or not key.startswith(b"dnsaddr") or not value:
            continue
        try:
            text = value.decode()
        except UnicodeDecodeError:
            continue
        if "/p2p/" not in text:
            continue
        pid = text.rsplit("/p2p/", 1)[1]
        peer = peer or pid
        if pid == peer:
            addrs.append(text)
    return (peer, addrs) if peer and addrs else None


@asynccontextmanager
async def open_mdns(
    *, mesh_id: str, peer_id: str, port: int, addrs: Sequence[str],
) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, list[str]]]]:
    """Advertise this node and yield a channel of (peer id, multiaddrs) finds."""
    from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

    stype = mdns_service_type(mesh_id)
    my_name = f"{peer_id}.{stype}"
    token = trio.lowlevel.current_trio_token()
    send, recv = trio.open_memory_channel[tuple[str, list[str]]](256)
    ips = sorted({a.split("/")[2] for a in addrs if a.startswith("/ip4/")},
                 key=lambda ip: ip.startswith("127."))
    info = ServiceInfo(
        stype, my_name, port=port, properties=_txt(peer_id, addrs),
        server=f"{peer_id.lower()[-40:]}.local.",
        addresses=[socket.inet_aton(ip) for ip in ips],
    )

    def deliver(found: tuple[str, list[str]]) -> None:
        try:
            send.send_nowait(found)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        # Runs in zeroconf's browser thread, where blocking is fine.
        if name == my_name or state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        try:
            got = zeroconf.get_service_info(service_type, name, timeout=MDNS_QUERY_TIMEOUT_MS)
            parsed = _parse_info(got) if got else None
            if parsed and parsed[0] != peer_id:
                trio.from_thread.run_sync(deliver, parsed, trio_token=token)
        except trio.RunFinishedError:
            pass
        except Exception as exc:
            log.debug("mDNS: cannot read %s: %r", name, exc)

    def start() -> tuple[Any, Any]:
        zc = Zeroconf(ip_version=IPVersion.V4Only)
        try:
            zc.register_service(info)
            browser = ServiceBrowser(zc, stype, handlers=[on_change])
        except BaseException:
            zc.close()
            raise
        return zc, browser

    def stop(zc: Any, browser: Any) -> None:
        try:
            browser.cancel()
            zc.unregister_service(info)
        finally:
            zc.close()

    zc, browser = await trio.to_thread.run_sync(start)
    log.info("mDNS: advertising %s as %s", stype, peer_id)
    try:
        async with recv:
            yield recv
    finally:
        send.close()
        with trio.CancelScope(shield=True), trio.move_on_after(1.5):
            await trio.to_thread.run_sync(stop, zc, browser, abandon_on_cancel=True)
