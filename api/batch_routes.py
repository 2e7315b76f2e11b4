"""OpenAI's Files and Batch APIs: /v1/files and /v1/batches.

    POST   /v1/files                      multipart: file, purpose (batch | user_data)
    GET    /v1/files                      ?purpose, limit (1-10000), order, after
    GET    /v1/files/{id}                 the File object, from whichever node holds it
    GET    /v1/files/{id}/content         its bytes
    DELETE /v1/files/{id}
    POST   /v1/batches                    {input_file_id, endpoint, completion_window, metadata}
    GET    /v1/batches                    ?after, limit (1-100): this node's batches
    GET    /v1/batches/{id}               from whichever node runs it
    POST   /v1/batches/{id}/cancel

The stores and the runner live in node/uploads.py and node/batches.py (reached through
the Services façade); this module only checks the HTTP side and writes OpenAI's shapes.
Files and batches belong to the API key that made them: another key gets 404, as for a
missing one. Lists show what this node holds (each node answers for its own uploads
and batches); single objects are fetched from their node, which the id names.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response, request

from api.body import json_body
from api.common import caller, services
from api.errors import json_response
from mesh.errors import BadRequest, UnsupportedMedia

bp = Blueprint("batch", __name__)

PURPOSES = ("batch", "user_data")


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def _int(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be an integer between {lo} and {hi}", param=name,
                         code="invalid_value")
    return value


def _known_args(*names: str) -> None:
    for name in request.args:
        if name not in names:
            raise BadRequest(f"unrecognized query parameter: {name}", param=name)


# ------------------------------------------------------------------ files
@bp.post("/v1/files")
async def upload():
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise BadRequest("expected a multipart/form-data body with 'file' and 'purpose'",
                         param="file")
    raw = await request.get_data()

    async def once():
        yield raw

    parser = request.make_form_data_parser()
    form, files = await parser.parse(once(), request.mimetype, len(raw), request.mimetype_params)
    for name in form:
        if name != "purpose":
            raise BadRequest(f"'{name}' is not supported by this server", param=name,
                             code="unsupported_parameter")
    purpose = form.get("purpose")
    if purpose is None:
        raise BadRequest("you must provide 'purpose'", param="purpose",
                         code="missing_required_parameter")
    if purpose not in PURPOSES:
        raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)} on this server",
                         param="purpose", code="invalid_value")
    upload = files.get("file")
    if upload is None:
        raise BadRequest("you must provide 'file'", param="file",
                         code="missing_required_parameter")
    data = upload.read()
    if not data:
        raise UnsupportedMedia("the uploaded file is empty", param="file")
    who = caller()
    obj = await services().files.put(data, upload.filename or "upload", purpose,
                                     who.get("key_id") if who else None)
    return json_response(obj)


@bp.get("/v1/files")
async def list_files():
    _known_args("purpose", "limit", "order", "after")
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("'order' must be asc or desc", param="order", code="invalid_value")
    data, more = await services().files.list(
        caller(), purpose=request.args.get("purpose"), after=request.args.get("after"),
        limit=_int("limit", 10000, 1, 10000), order=order)
    return json_response(_page(data, more))


@bp.get("/v1/files/<file_id>")
async def get_file(file_id: str):
    return json_response(await services().files.meta(file_id, caller()))


@bp.get("/v1/files/<file_id>/content")
async def file_content(file_id: str):
    data = await services().files.content(file_id, caller())
    return Response(data, mimetype="application/octet-stream")


@bp.delete("/v1/files/<file_id>")
async def delete_file(file_id: str):
    await services().files.remove(file_id, caller())
    return json_response({"id": file_id, "object": "file", "deleted": True})


# ---------------------------------------------------------------- batches
class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)
    output_expires_after: Any = None


@bp.post("/v1/batches")
async def create_batch():
    body = await json_body(BatchCreate)
    if body.output_expires_after is not None:
        raise BadRequest("'output_expires_after' is not supported by this server: output "
                         "files are kept until deleted", param="output_expires_after",
                         code="unsupported_parameter")
    return json_response(await services().batches.create(
        caller(), input_file_id=body.input_file_id, endpoint=body.endpoint,
        completion_window=body.completion_window, metadata=body.metadata))


@bp.get("/v1/batches")
async def list_batches():
    _known_args("after", "limit")
    data, more = services().batches.list(caller(), after=request.args.get("after"),
                                         limit=_int("limit", 20, 1, 100))
    return json_response(_page(data, more))


@bp.get("/v1/batches/<batch_id>")
async def get_batch(batch_id: str):
    return json_response(await services().batches.retrieve(batch_id, caller()))


@bp.post("/v1/batches/<batch_id>/cancel")
async def cancel_batch(batch_id: str):
    return json_response(await services().batches.cancel(batch_id, caller()))
