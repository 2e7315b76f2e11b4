"""The mesh's nodes: `GET /mesh/nodes` (every node ever admitted: id, name, first and
last seen, revoked) and `POST /mesh/nodes/<ref>/revoke` (admin): the node is dropped
and refused by every node of the mesh as the revocation spreads (mesh/nodes.py)."""

from __future__ import annotations

from quart import Blueprint

from api.common import services
from api.errors import json_response
from mesh.errors import BadRequest

bp = Blueprint("nodes", __name__)


def _book():
    svc = services()
    if svc.nodes is None:
        raise BadRequest("this node is not part of a mesh (started without --token)",
                         code="not_meshed")
    return svc


@bp.get("/mesh/nodes")
async def list_nodes():
    svc = _book()
    alive = set(svc.p2p.connected_peers())
    data = [{**r, "connected": r["peer_id"] in alive, "self": r["peer_id"] == svc.p2p.peer_id}
            for r in svc.nodes.listing()]
    return json_response({"object": "list", "data": data})


@bp.post("/mesh/nodes/<ref>/revoke")
async def revoke_node(ref: str):
    svc = _book()
    rec = svc.nodes.revoke(ref)
    await svc.p2p.revoke(svc.nodes.revoked())
    svc.notify_changed()              # our gossip carries it to every node
    return json_response(rec.public())
