"""The mesh's nodes: `GET /mesh/nodes` (every node ever admitted: id, name, first and
last seen, revoked) and `POST /mesh/nodes/<ref>/revoke` (admin): the node is dropped
and refused by every node of the mesh as the revocation spreads (mesh/nodes.py).
`POST /mesh/token/rotate` (admin) `{"grace_s": 300}`: a new mesh token for every node
alive, the old one retired after the grace period (mesh/p2p/rekey.py); the answer holds
the new token (for machines that join after the grace period: during it the
mesh still signs with the old one), once."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint

from api.body import json_body
from api.common import services
from api.errors import json_response
from mesh.errors import BadRequest

DEFAULT_GRACE_S = 300.0


class Rotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_s: float = Field(DEFAULT_GRACE_S, description="seconds the old token is still accepted")

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


@bp.post("/mesh/token/rotate")
async def rotate_token():
    svc = _book()
    body = await json_body(Rotate, example=' like {"grace_s": 300}')
    out = await svc.p2p.rotate(body.grace_s)
    names = {p.peer_id: p.name for p in svc.p2p.view.peers()}
    return json_response({**out, "delivered": [{"peer_id": p, "name": names.get(p, "")} for p in out["delivered"]],
                          "missed": [{"peer_id": p, "name": names.get(p, ""), "error": why}
                                     for p, why in out["missed"].items()]})
