"""Node and mesh routes: liveness, readiness, status, metrics.

    GET /health        200 while the process serves HTTP (liveness)
    GET /readyz        200 once the node's models are loaded, else 503 (llama-server style)
    GET /mesh/status   this node and every node the mesh knows (docs/architecture.md)
    GET /metrics       Prometheus text format
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Blueprint, Response, current_app

from api.errors import json_response

bp = Blueprint("mesh", __name__)


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


@bp.get("/metrics")
async def metrics():
    return Response(generate_latest(_services().metrics.registry), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/openapi.json")
async def openapi():
    from api.openapi import build
    app = current_app._get_current_object()
    doc = app.config.get("OPENAPI_DOC")
    if doc is None:
        doc = app.config["OPENAPI_DOC"] = build(app)
    return json_response(doc)
