"""`GET /openapi.json`: the OpenAPI 3.1 document of the whole HTTP API, built from the code.

Paths and methods come from the app's own URL map (so a route cannot be missing from the
document), request bodies from the same pydantic models that validate them, and every
error response is OpenAI's shape. `DOCS` adds a summary, the API-key feature a route
needs, and its request model; a route without an entry is still listed (a test checks
that every route has one).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from api.agent_routes import RunCreate
from api.anthropic_routes import MessagesPrompt, MessagesRequest
from api.auth import OPEN_PATHS, feature_for
from api.batch_routes import BatchCreate
from api.key_routes import KeyCreate
from api.model_routes import Install, Load, Unload
from api.node_routes import Rotate
from api.ollama_routes import (ChatBody, DeleteBody, EmbedBody, EmbeddingsBody, GenerateBody,
                               PullBody, ShowBody)
from api.responses_routes import ResponsesRequest
from api.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, TranscriptionForm
from api.speech_routes import SpeechRequest
from api.tokenize_routes import DetokenizeBody, TokenizeBody

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                             "properties": {"message": {"type": "string"},
                                            "type": {"type": "string"},
                                            "param": {"type": ["string", "null"]},
                                            "code": {"type": ["string", "null"]}}}}}


DOCS: dict[str, tuple[str, type[BaseModel] | None]] = {
    "openai.list_models": ("List the models served anywhere in the mesh", None),
    "openai.get_model": ("One model's card", None),
    "openai.chat_completions": ("Chat completion (stream or not)", ChatRequest),
    "openai.completions": ("Text completion (stream or not)", CompletionRequest),
    "openai.embeddings": ("Embeddings", EmbeddingRequest),
    "openai.transcriptions": ("Speech to text (multipart)", TranscriptionForm),
    "speech.speech": ("Text to speech: audio bytes streamed as synthesized, or SSE",
                      SpeechRequest),
    "anthropic.messages": ("Anthropic Messages: a message (stream or not)", MessagesRequest),
    "anthropic.count_tokens": ("Anthropic Messages: the tokens of a prompt", MessagesPrompt),
    "responses.create_response": ("Responses API: create a response (stream or not)",
                                  ResponsesRequest),
    "responses.get_response": ("A stored response, from whichever node stored it", None),
    "responses.delete_response": ("Delete a stored response", None),
    "responses.input_items": ("A stored response's input items, paginated", None),
    "tokenize.tokenize": ("llama-server: a text's (or chat prompt's) token ids", TokenizeBody),
    "tokenize.detokenize": ("llama-server: token ids back to text", DetokenizeBody),
    "batch.upload": ("Upload a file (multipart: the file and its purpose)", None),
    "batch.list_files": ("The files this node holds that the key may see", None),
    "batch.get_file": ("A file's object, from whichever node holds it", None),
    "batch.file_content": ("A file's bytes", None),
    "batch.delete_file": ("Delete a file", None),
    "batch.create_batch": ("Create a batch from an uploaded JSONL file", BatchCreate),
    "batch.list_batches": ("This node's batches, newest first", None),
    "batch.get_batch": ("A batch, from whichever node runs it", None),
    "batch.cancel_batch": ("Cancel a batch (finished lines are kept)", None),
    "agents.list_agents": ("The agents this key sees", None),
    "agents.create_agent": ("Create an agent from its definition (name, model, "
                            "instructions, tools, limits, schedule)", None),
    "agents.get_agent": ("One agent: definition, where it can run, its next ticks", None),
    "agents.replace_agent": ("Replace an agent's definition (a new revision, mesh-wide)", None),
    "agents.delete_agent": ("Delete an agent mesh-wide", None),
    "agents.start_run": ("Run an agent now on this node (webhook); stream: SSE of its steps",
                         RunCreate),
    "agents.list_runs": ("An agent's runs on every node, newest first", None),
    "agents.get_run": ("One run, from the node that holds it", None),
    "agents.run_steps": ("A run's steps: model calls, tool calls and results", None),
    "agents.run_events": ("A run's steps as server-sent events while it runs", None),
    "nodes.list_nodes": ("Every node ever admitted to the mesh, and the revoked ones", None),
    "nodes.revoke_node": ("Revoke a node mesh-wide: dropped and refused by every node", None),
    "nodes.rotate_token": ("Rotate the mesh token: a new one for every alive node, the old one "
                           "retired after the grace period", Rotate),
    "mesh.health": ("Liveness", None),
    "mesh.readyz": ("Readiness: 503 until the node's models are loaded", None),
    "mesh.status": ("This node and every node of the mesh", None),
    "mesh.metrics": ("Prometheus metrics", None),
    "mesh.mesh_metrics": ("Prometheus metrics of every node, from gossiped state", None),
    "mesh.events": ("The mesh status as server-sent events, with every link's RTT", None),
    "dashboard.index": ("The web dashboard (open; its data calls need a key)", None),
    "dashboard.static_file": ("A file of the web dashboard (open)", None),
    "dashboard.session": ("Who the presented API key is (any valid key)", None),
    "models.gallery": ("Installable models", None),
    "models.models": ("Installed, loaded and mesh-wide models", None),
    "models.install_model": ("Start an install job", Install),
    "models.job": ("An install job's progress", None),
    "models.job_events": ("An install job's progress as server-sent events", None),
    "models.load_model": ("Load an installed model", Load),
    "models.unload_model": ("Unload a model", Unload),
    "models.remove_model": ("Delete an installed model", None),
    "keys.list_keys": ("List API keys (never their secrets)", None),
    "keys.create_key": ("Create an API key; the response shows it once", KeyCreate),
    "keys.revoke_key": ("Revoke an API key mesh-wide", None),
    "mesh.openapi": ("This document", None),
    "ollama.chat": ("Ollama: a chat turn (NDJSON stream or one object)", ChatBody),
    "ollama.generate": ("Ollama: a completion of a prompt (NDJSON stream or one object)",
                        GenerateBody),
    "ollama.embed": ("Ollama: embeddings of one input or a list", EmbedBody),
    "ollama.embeddings": ("Ollama: one embedding (legacy form)", EmbeddingsBody),
    "ollama.tags": ("Ollama: the models usable from this node", None),
    "ollama.ps": ("Ollama: the models loaded on this node, with when each unloads", None),
    "ollama.show": ("Ollama: a model's details, metadata, template and parameters", ShowBody),
    "ollama.pull": ("Ollama: install a gallery model, with progress lines", PullBody),
    "ollama.delete": ("Ollama: delete an installed model", DeleteBody),
    "ollama.version": ("Ollama: the Ollama API version this node follows", None),
}

OLLAMA_ERROR_SCHEMA = {"type": "object", "required": ["error"],
                       "properties": {"error": {"type": "string"}}}

ANTHROPIC_ERROR_SCHEMA = {
    "type": "object", "required": ["type", "error"],
    "properties": {"type": {"const": "error"},
                   "error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"},
                                            "message": {"type": "string"}}}}}


def _path(rule: str) -> tuple[str, list[str]]:
    names = re.findall(r"<(?:[a-z]+:)?([a-z_]+)>", rule)
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule), names


def build(app) -> dict[str, Any]:
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, Any] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path, params = _path(rule.rule)
        summary, model = DOCS.get(rule.endpoint, (rule.endpoint, None))
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            op: dict[str, Any] = {
                "operationId": rule.endpoint.replace(".", "_") + ("" if method == "GET" else f"_{method.lower()}"),
                "summary": summary,
                "parameters": [{"name": p, "in": "path", "required": True,
                                "schema": {"type": "string"}} for p in params],
                "responses": {"2XX": {"description": "success"},
                              "default": {"description": "an error, in OpenAI's shape",
                                          "content": {"application/json": {
                                              "schema": {"$ref": "#/components/schemas/Error"}}}}},
            }
            if path.startswith("/v1/messages"):   # Anthropic's dialect (api/errors.py)
                components["AnthropicError"] = ANTHROPIC_ERROR_SCHEMA
                op["responses"]["default"] = {
                    "description": "an error, in Anthropic's shape", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/AnthropicError"}}}}
            if path.startswith("/api/"):           # Ollama's dialect: {"error": "..."}
                components["OllamaError"] = OLLAMA_ERROR_SCHEMA
                op["responses"]["default"] = {
                    "description": "an error, in Ollama's shape", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/OllamaError"}}}}
            if rule.endpoint == "mesh.readyz":     # llama-server style: 503 while loading
                op["responses"]["503"] = {"description": "not ready yet", "content": {
                    "application/json": {"schema": {"type": "object", "required": ["status"],
                                                    "properties": {"status": {"type": "string"},
                                                                   "models": {"type": "object"}}}}}}
            feature = None if path in OPEN_PATHS else feature_for(path)
            if feature:
                op["security"] = [{"bearer": []}, {}]
                op["x-mesh-feature"] = feature
            if model is not None and method != "GET":
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
                ref = {"$ref": f"#/components/schemas/{model.__name__}"}
                if model is TranscriptionForm:
                    body_schema = {"allOf": [ref, {"type": "object", "required": ["file"],
                                                   "properties": {"file": {"type": "string",
                                                                           "format": "binary"}}}]}
                    op["requestBody"] = {"required": True, "content": {
                        "multipart/form-data": {"schema": body_schema}}}
                else:
                    op["requestBody"] = {"required": True,
                                         "content": {"application/json": {"schema": ref}}}
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "inference-mesh", "version": "0.1.0",
                 "description": "OpenAI-compatible API of an inference-mesh node, plus its "
                                "mesh and model management routes."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
