"""Agents and their runs (docs/agents.md): the `agents` feature.

    GET    /v1/agents                              the agents this key sees
    POST   /v1/agents                              create (an agent definition, JSON)
    GET    /v1/agents/{name}                       one, with where it can run and its next ticks
    PUT    /v1/agents/{name}                       replace (a new revision, mesh-wide)
    DELETE /v1/agents/{name}                       delete mesh-wide
    POST   /v1/agents/{name}/runs                  run now here (the webhook trigger):
                                                   {"input": str, "stream": bool}
    GET    /v1/agents/{name}/runs                  its runs on every node, newest first
    GET    /v1/agents/{name}/runs/{id}             one run, from the node that holds it
    GET    /v1/agents/{name}/runs/{id}/steps       its steps (model and tool calls)
    GET    /v1/agents/{name}/runs/{id}/events      its steps as SSE while it runs, then the run

The service (definitions, replication, placement, runs) lives in node/agents/, reached
through the Services façade; this module only reads HTTP and writes JSON and SSE. A
streamed run sends the run object, each step as it is recorded, the final run object,
then `[DONE]`; an error after the first byte is an `error` event, as in the OpenAI
dialect.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from pydantic import BaseModel, ConfigDict
from quart import Blueprint, Response, request

from api.body import DONE, json_body, sse, sse_response
from api.common import caller, services
from api.errors import json_response, openai_error
from mesh.errors import BadRequest, MeshError

bp = Blueprint("agents", __name__)


async def _definition() -> dict[str, Any]:
    raw = await request.get_data()
    try:
        data = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"could not parse the JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be an agent definition: a JSON object with name, "
                         "model, instructions, tools, limits, schedule")
    return data


def _limit() -> int:
    for name in request.args:
        if name != "limit":
            raise BadRequest(f"unrecognized query parameter: {name}", param=name)
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise BadRequest("'limit' must be an integer between 1 and 100", param="limit",
                         code="invalid_value")
    return int(raw)


def _stream(events: AsyncIterator[dict[str, Any]], first: list[dict[str, Any]]) -> Response:
    async def body() -> AsyncIterator[bytes]:
        for ev in first:
            yield sse(ev)
        try:
            async for ev in events:
                yield sse(ev)
        except MeshError as exc:
            yield sse(openai_error(exc))
        yield DONE

    return sse_response(body())


@bp.get("/v1/agents")
async def list_agents():
    return json_response({"object": "list", "data": services().agents.list(caller())})


@bp.post("/v1/agents")
async def create_agent():
    return json_response(services().agents.create(caller(), await _definition()), status=201)


@bp.get("/v1/agents/<name>")
async def get_agent(name: str):
    return json_response(services().agents.get(name, caller()))


@bp.put("/v1/agents/<name>")
async def replace_agent(name: str):
    return json_response(services().agents.replace(caller(), name, await _definition()))


@bp.delete("/v1/agents/<name>")
async def delete_agent(name: str):
    return json_response(services().agents.delete(caller(), name))


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = ""
    stream: bool = False


@bp.post("/v1/agents/<name>/runs")
async def start_run(name: str):
    body = await json_body(RunCreate, example=' like {"input": "What changed today?"}')
    agents, who = services().agents, caller()
    run = await agents.start(who, name, body.input)
    if body.stream:
        return _stream(agents.follow(who, name, run["id"]), [run])
    return json_response(run, status=202)


@bp.get("/v1/agents/<name>/runs")
async def list_runs(name: str):
    return json_response(await services().agents.runs(caller(), name, _limit()))


@bp.get("/v1/agents/<name>/runs/<run_id>")
async def get_run(name: str, run_id: str):
    return json_response(await services().agents.run(caller(), name, run_id))


@bp.get("/v1/agents/<name>/runs/<run_id>/steps")
async def run_steps(name: str, run_id: str):
    got = await services().agents.run(caller(), name, run_id, with_steps=True)
    return json_response({"object": "list", "data": got["steps"]})


@bp.get("/v1/agents/<name>/runs/<run_id>/events")
async def run_events(name: str, run_id: str):
    agents, who = services().agents, caller()
    await agents.run(who, name, run_id)          # a 404 before the stream starts
    return _stream(agents.follow(who, name, run_id), [])
