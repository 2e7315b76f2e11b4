"""Model management: the gallery, installed and loaded models, install jobs.

    GET    /mesh/gallery                what can be installed (the index)
    GET    /mesh/models                 installed here, loaded here, served mesh-wide
    POST   /mesh/models/install         {"id", "load"?: bool} -> 202 + job
    GET    /mesh/jobs/<id>              a job's state, bytes done/total, speed
    GET    /mesh/jobs/<id>/events       the same as SSE, one event per change, until it ends
    POST   /mesh/models/load            {"id", "split"?: bool} -> the loaded model (waits for
                                        the load); split: spread it over peers lending memory
    POST   /mesh/models/unload          {"id"}
    DELETE /mesh/models/<id>            remove the installed files (unload first)
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from quart import Blueprint, current_app

from api.body import json_body, sse, sse_response
from api.errors import json_response
from gallery import resolve
from mesh.errors import BadRequest, Conflict, NotFound

bp = Blueprint("models", __name__)


class Install(BaseModel):
    """Body of install: each route takes only the fields it honours (extra is a 400)."""
    model_config = ConfigDict(extra="forbid")
    id: str
    load: bool = False


class Load(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    split: bool = False
    force: bool = False        # split even a model that fits here (node/placement.py)


class Unload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


def _services():
    return current_app.config["MESH"]


async def _body(model: type[BaseModel]) -> Any:
    return await json_body(model, example=' like {"id": "smollm2"}')


@bp.get("/mesh/gallery")
async def gallery():
    svc = _services()
    installed = {m.id for m in svc.store.list()}
    data = [{**e.model_dump(mode="json"), "installed": e.id in installed}
            for e in svc.index.values()]
    return json_response({"object": "list", "data": sorted(data, key=lambda e: e["id"])})


@bp.get("/mesh/models")
async def models():
    svc = _services()
    installed = [{"id": m.id, "backend": m.backend, "aliases": m.aliases,
                  "size_bytes": m.size_bytes, "path": str(m.dir), "config": m.config}
                 for m in svc.store.list()]
    mesh: dict[str, list[str]] = {}
    for node in svc.status()["nodes"]:
        for m in node.get("models", []):
            mesh.setdefault(m["id"], []).append(node.get("name"))
    return json_response({"installed": installed, "loaded": svc.pool.snapshot(),
                          "mesh": [{"id": k, "nodes": v} for k, v in sorted(mesh.items())]})


@bp.post("/mesh/models/install")
async def install_model():
    svc = _services()
    body = await _body(Install)
    entry = resolve(svc.index, body.id)
    job = svc.jobs.start(entry, load=body.load)
    return json_response(job.to_dict(), status=202)


@bp.get("/mesh/jobs/<job_id>")
async def job(job_id: str):
    return json_response(_services().jobs.get(job_id).to_dict())


@bp.get("/mesh/jobs/<job_id>/events")
async def job_events(job_id: str):
    job = _services().jobs.get(job_id)

    async def events():
        while True:
            changed = job.changed
            ended, state = job.ended, job.to_dict()   # together: the last event is the end
            yield sse(state)
            if ended:
                return
            await changed.wait()

    return sse_response(events())


@bp.post("/mesh/models/load")
async def load_model():
    svc = _services()
    body = await _body(Load)
    if body.force and not body.split:
        raise BadRequest("force only applies to a split (it overrides the refusal of a split "
                         "that would be slower than loading here): add split", param="force",
                         code="force_without_split")
    if body.split and svc.splits is None:
        raise BadRequest("splitting a model across nodes needs a mesh: start the node "
                         "with --token", param="split", code="split_unavailable")
    installed = svc.store.get(body.id)
    if installed is None:
        raise NotFound(f"model {body.id!r} is not installed here; install it first "
                       f"(mesh install {body.id})", param="id", code="model_not_installed")
    if body.split:
        worker = await svc.splits.load(installed, force=body.force)
        svc.notify_changed()
        return json_response(worker.describe())
    worker = await svc.load_model(installed)
    return json_response(worker.describe())


@bp.post("/mesh/models/unload")
async def unload_model():
    svc = _services()
    body = await _body(Unload)
    worker = svc.pool.find(body.id)
    if worker is None:
        raise NotFound(f"model {body.id!r} is not loaded here", param="id",
                       code="model_not_loaded")
    await svc.unload_model(worker.id)
    return json_response({"id": worker.id, "state": "unloaded"})


@bp.delete("/mesh/models/<path:model_id>")
async def remove_model(model_id: str):
    svc = _services()
    installed = svc.store.get(model_id)
    if installed is None:
        raise NotFound(f"model {model_id!r} is not installed here", code="model_not_installed")
    if svc.pool.find(installed.id) is not None:
        raise Conflict(f"model {installed.id!r} is loaded; unload it first (mesh unload "
                       f"{installed.id})", code="model_loaded")
    svc.store.remove(installed.id)
    return json_response({"id": installed.id, "deleted": True})
