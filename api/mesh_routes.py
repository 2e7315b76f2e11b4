"""Node and mesh routes: liveness, readiness, status, its live stream, metrics.

    GET /health        200 while the process serves HTTP (liveness)
    GET /readyz        200 once the node's models are loaded, else 503 (llama-server style)
    GET /mesh/status   this node and every node the mesh knows (docs/architecture.md)
    GET /mesh/events   the same as server-sent events, plus `rtt`: {node id: {peer id: ms}}
                       (each node's own measurements, from gossip), at each change of the
                       view and at least every TICK_S; the stream ends after STREAM_S with
                       `retry:` set, so a client reconnects and no stream is held forever
    GET /metrics       Prometheus text format: this node (node/metrics.py)
    GET /mesh/metrics  the whole mesh in one scrape, built from gossiped state (no peer is
                       scraped), labelled by node
"""

from __future__ import annotations

import time

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Blueprint, Response, current_app

from api.body import sse, sse_response
from api.errors import json_response

bp = Blueprint("mesh", __name__)

TICK_S = 1.0        # worker figures (slots busy, tokens/s) refresh once a second
COALESCE_S = 0.2    # view changes closer than this go out as one event
STREAM_S = 15.0     # then the client reconnects (EventSource does; the dashboard too)


def _services():
    return current_app.config["MESH"]


@bp.get("/health")
async def health():
    return json_response({"status": "ok"})


@bp.get("/readyz")
async def readyz():
    ready, detail = _services().readiness()
    return json_response({"status": "ready" if ready else "loading", **detail},
                         status=200 if ready else 503)


@bp.get("/mesh/status")
async def status():
    return json_response(_services().status())


def picture(svc) -> dict:
    """The status and the RTT of every link any node measured."""
    rtt: dict[str, dict[str, float]] = {}
    if svc.p2p is not None:
        peers = svc.p2p.view.peers()
        rtt[svc.p2p.peer_id] = {p.peer_id: round(p.rtt_ms, 2) for p in peers
                                if p.rtt_ms is not None}
        for p in peers:
            theirs = p.state.extra.get("rtt_ms")
            if isinstance(theirs, dict):
                rtt[p.peer_id] = {k: float(v) for k, v in theirs.items()
                                  if isinstance(k, str) and isinstance(v, (int, float))}
    return {**svc.status(), "rtt": rtt, "ts": time.time()}


@bp.get("/mesh/events")
async def events():
    svc = _services()

    async def stream():
        end = trio.current_time() + STREAM_S
        yield b"retry: 1000\n\n"
        while trio.current_time() < end:
            yield sse(picture(svc))
            with trio.move_on_after(TICK_S):
                if svc.p2p is None:
                    await trio.sleep_forever()
                await svc.p2p.view.changed.wait()
            await trio.sleep(COALESCE_S)

    return sse_response(stream())


@bp.get("/metrics")
async def metrics():
    return Response(generate_latest(_services().metrics.registry), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/mesh/metrics")
async def mesh_metrics():
    return Response(_services().metrics.mesh_scrape(), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/openapi.json")
async def openapi():
    from api.openapi import build
    app = current_app._get_current_object()
    doc = app.config.get("OPENAPI_DOC")
    if doc is None:
        doc = app.config["OPENAPI_DOC"] = build(app)
    return json_response(doc)
