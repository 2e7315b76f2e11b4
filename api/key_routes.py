"""Key management: `GET/POST /mesh/keys`, `DELETE /mesh/keys/<name>` (api/auth.py guards it)."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict
from quart import Blueprint, current_app, request

from api.errors import json_response
from mesh.errors import BadRequest

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
    try:
        data = json.loads(await request.get_data() or b"null")
    except ValueError as exc:
        raise BadRequest(f"could not parse the JSON body: {exc}", code="invalid_json") from exc
    body = KeyCreate.model_validate(data if isinstance(data, dict) else {})
    svc = _services()
    rec, secret = svc.keyring.create(body.name, body.features)
    svc.notify_changed()
    return json_response({**rec.public(), "key": secret}, status=201)


@bp.delete("/mesh/keys/<name>")
async def revoke_key(name: str):
    svc = _services()
    revoked = svc.keyring.revoke(name)
    svc.notify_changed()
    return json_response({"object": "list", "data": [r.public() for r in revoked]})
