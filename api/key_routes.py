"""Key management: `GET/POST /mesh/keys`, `DELETE /mesh/keys/<name>[?force=true]`
(api/auth.py guards it; the last live key is only revoked with force)."""

from __future__ import annotations


from pydantic import BaseModel, ConfigDict
from quart import Blueprint, current_app, request

from api.body import json_body
from api.errors import json_response

bp = Blueprint("keys", __name__)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    features: list[str]


def _services():
    return current_app.config["MESH"]


@bp.get("/mesh/keys")
async def list_keys():
    return json_response({"object": "list", "data": _services().keyring.listing()})


@bp.post("/mesh/keys")
async def create_key():
    body = await json_body(KeyCreate, example=' like {"name": "ci", "features": ["chat"]}')
    svc = _services()
    rec, secret = svc.keyring.create(body.name, body.features)
    svc.notify_changed()
    return json_response({**rec.public(), "key": secret}, status=201)


@bp.delete("/mesh/keys/<name>")
async def revoke_key(name: str):
    svc = _services()
    force = request.args.get("force", "false").lower() in ("1", "true", "yes")
    revoked = svc.keyring.revoke(name, force=force)
    svc.notify_changed()
    return json_response({"object": "list", "data": [r.public() for r in revoked]})
