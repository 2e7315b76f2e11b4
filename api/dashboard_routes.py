"""The web dashboard: its static files and the one call it needs beyond the public API.

    GET /                    the dashboard page (api/static/index.html)
    GET /ui/<file>           its scripts, styles and images (api/static/)
    GET /dashboard/session   who the presented key is: {node, enforcing, caller, features}
                             (any valid key; `features`: those a new key may carry)

The page itself is open (api/auth.py OPEN_PATHS, OPEN_PREFIXES): it holds no data. Every
call it makes for data goes through the same API-key check as any client's: the browser
keeps the key in sessionStorage and sends it as `Authorization: Bearer` on each fetch
(EventSource cannot send headers, so the page reads server-sent events with fetch). The
mesh picture is `/mesh/events` (api/mesh_routes.py, admin), chat is `/v1/chat/completions`,
and so on: the dashboard has no private back door.

Only files that ship in api/static/ are served (the listing is read once, so no path from
the URL ever reaches the file system), with a Content-Security-Policy that forbids
anything from another origin, inline scripts included: nothing is fetched at run time.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response

from api.common import caller, services
from api.errors import json_response
from mesh.errors import NotFound
from mesh.keys import FEATURES

bp = Blueprint("dashboard", __name__)

STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
         ".ico": "image/x-icon"}
FILES = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*")
         if p.is_file() and p.suffix in TYPES}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    path = FILES.get(name)
    if path is None:
        raise NotFound(f"no dashboard file {name!r}", code="not_found")
    return Response(path.read_bytes(), content_type=TYPES[path.suffix], headers=HEADERS)


@bp.get("/")
async def index():
    return _file("index.html")


@bp.get("/ui/<path:name>")
async def static_file(name: str):
    return _file(name)


@bp.get("/dashboard/session")
async def session():
    svc = services()
    who = caller()
    return json_response({
        "object": "mesh.session", "node": svc.node_name, "enforcing": svc.keyring.enforcing,
        "caller": {"name": who["name"], "features": who["features"]} if who else None,
        "features": list(FEATURES)})
