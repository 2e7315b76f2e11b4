"""Ollama's HTTP API on every node, for Open WebUI, Continue and the `ollama` package.

    POST   /api/chat         a chat turn: NDJSON stream (default) or one object (stream false)
    POST   /api/generate     a completion of `prompt` (the model's chat template unless raw)
    POST   /api/embed        L2-normalised embeddings of `input` (a string or a list)
    POST   /api/embeddings   the legacy one-vector form
    GET    /api/tags         the models usable from here: installed here or served by the mesh
    GET    /api/ps           the models loaded on this node, with their keep_alive expiry
    POST   /api/show         details, GGUF metadata, template, parameters, capabilities
    POST   /api/pull         a gallery install, streamed as Ollama's progress lines
    DELETE /api/delete       remove an installed model (unloaded first)
    GET    /api/version      the Ollama API version this adapter follows

A thin adapter like api/openai_routes.py: each body is validated (extra fields refused, as
every dialect here refuses what it cannot honour), translated into the wire's Generate /
Embed (mesh/wire/inference.py) and sent through the router; events come back as Ollama's
objects. docs/ollama.md lists every field and option with its treatment.

Model names: the mesh's ids and aliases, with or without Ollama's default tag (`smollm2`
and `smollm2:latest` are one model); listed as `<id>:latest`.

keep_alive (node/keepalive.py, reached as `services().keepalive`): a model this node has
installed is loaded by the request that names it and stays loaded for the request's
keep_alive afterwards, as Ollama does; an empty `messages` / `prompt` only loads it, or,
with keep_alive 0, unloads it. A model only a peer serves stays as that peer's own
configuration keeps it, so a keep_alive for it is refused with a 400 naming keep_alive.

Durations (ns) are measured here, at the node the client talks to: total (request in to
answer out), load (finding, or loading on demand, the local model), prompt_eval (request
sent until its first event: queue, prefill and the first token), eval (first event to Done).

Errors before the first line are `{"error": "..."}` with the table's status
(api/errors.py picks Ollama's shape for /api/ paths); after it, a final NDJSON line
`{"error": "..."}`, which the ollama client raises as ResponseError.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from quart import Blueprint, Response

from api.body import json_body
from api.common import (check_tool_choice, collect, function_tool, json_constraint,
                        limit_tokens, node_headers, open_call, result, services)
from api.errors import json_response
from gallery import resolve
from mesh.errors import BadRequest, GalleryError, ModelNotFound, NotFound
from mesh.router import Call
from mesh.wire.inference import (Delta, Done, Embed, Failed, Generate, Message, Sampling,
                                 TokenLogprob, Tool, ToolCall, error_from_failed)

bp = Blueprint("ollama", __name__)

VERSION = "0.9.0"       # the Ollama API this adapter follows (docs/ollama.md: what differs)
FOREVER = "2318-01-01T00:00:00Z"     # expires_at of a model kept loaded for good, as Ollama's
FOREVER_TS = datetime(2318, 1, 1, tzinfo=timezone.utc).timestamp()
NDJSON = "application/x-ndjson"


# ------------------------------------------------------------------ bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


KeepAliveField = float | str | None


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class _Generation(_Body):
    model: str = Field(min_length=1)
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: KeepAliveField = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ChatBody(_Generation):
    messages: list[OllamaMessage] | None = None
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Generation):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[str] | None = None


class EmbedBody(_Body):
    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: KeepAliveField = None
    dimensions: int | None = Field(None, ge=1)


class EmbeddingsBody(_Body):
    model: str = Field(min_length=1)
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAliveField = None


class _Named(_Body):
    model: str | None = None
    name: str | None = None           # what older clients send

    def target(self) -> str:
        name = self.model or self.name
        if not name:
            raise BadRequest("you must provide 'model'", param="model",
                             code="missing_required_parameter")
        return name


class ShowBody(_Named):
    verbose: bool = False


class PullBody(_Named):
    insecure: bool = False
    stream: bool = True


class DeleteBody(_Named):
    pass


# ----------------------------------------------------------------- helpers
def _name(model: str) -> str:
    """The mesh's name for an Ollama model name: `x:latest` is `x`."""
    return model[: -len(":latest")] if model.endswith(":latest") else model


def _tag(model_id: str) -> str:
    return f"{model_id}:latest"


def _now() -> str:
    return _iso(time.time())


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _refuse(name: str, value: Any, why: str) -> None:
    """A 400 naming `name` when `value` asks for something (None, False, "", [] do not)."""
    if value not in (None, False, "", [], {}):
        raise BadRequest(f"'{name}' is not supported by this server: {why}", param=name,
                         code="unsupported_parameter")


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def _keep_alive(v: KeepAliveField) -> float | None:
    """keep_alive in seconds (math.inf: forever), None when not given. Ollama's forms: a
    number of seconds, a Go duration ("5m", "1h30m", "300ms"), negative for forever."""
    if v is None:
        return None
    secs: float | None = None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        secs = float(v)
    elif isinstance(v, str):
        s = v.strip()
        try:
            secs = float(s)
        except ValueError:
            body = s.lstrip("+-")
            parts = _PART.findall(body)
            if body and "".join(a + u for a, u in parts) == body:
                secs = sum(float(a) * _UNITS[u] for a, u in parts) * (-1 if s[0] == "-" else 1)
    if secs is None or math.isnan(secs):
        raise BadRequest(f"invalid keep_alive {v!r}: a number of seconds or a duration such "
                         "as '5m', '1h', '-1' (forever) or 0 (unload now)", param="keep_alive")
    return math.inf if secs < 0 else secs


# options: what each Ollama option does here (docs/ollama.md prints the table)
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty",
             "presence_penalty", "frequency_penalty")
_INT = {"top_k", "seed", "num_predict", "num_ctx"}
_HONOURED = {*_SAMPLING, "num_predict", "stop", "num_ctx"}
# how this node runs a model is its owner's configuration (model.yaml), not a request's;
# none of these changes what the model answers. num_keep: the context is never shifted
# (a prompt that does not fit is an error), so there is nothing to keep.
_ACCEPTED = {"num_thread", "num_gpu", "main_gpu", "low_vram", "use_mmap", "use_mlock",
             "numa", "num_batch", "f16_kv", "logits_all", "num_keep"}
# refused unless they hold the value this node's sampler has anyway
_NEUTRAL = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0, "repeat_last_n": 64,
            "penalize_newline": False, "vocab_only": False, "embedding_only": False}
_MIROSTAT_TUNING = {"mirostat_tau", "mirostat_eta"}   # no effect while mirostat is off


class _Options:
    """`options`, checked: the sampler, the token limit, the stop strings, num_ctx."""

    def __init__(self, opts: dict[str, Any] | None) -> None:
        opts = {k: v for k, v in (opts or {}).items() if v is not None}
        for k, v in opts.items():
            if k in _HONOURED or k in _ACCEPTED:
                continue
            if k in _MIROSTAT_TUNING and not opts.get("mirostat"):
                continue
            if k in _NEUTRAL and v == _NEUTRAL[k] and type(v) is not str:
                continue
            if k in _NEUTRAL or k in _MIROSTAT_TUNING:
                only = f" (only {_NEUTRAL[k]!r}, what it does here)" if k in _NEUTRAL else ""
                raise BadRequest(f"option '{k}' is not supported by this server{only}",
                                 param=f"options.{k}", code="unsupported_parameter")
            raise BadRequest(f"unknown option '{k}'", param=f"options.{k}",
                             code="unsupported_parameter")
        for k in _INT & opts.keys():
            v = opts[k]
            if isinstance(v, float) and v.is_integer():
                opts[k] = int(v)
            elif not isinstance(v, int) or isinstance(v, bool):
                raise BadRequest(f"option '{k}' must be an integer", param=f"options.{k}")
            if not -2**63 <= opts[k] < 2**63:
                raise BadRequest(f"option '{k}' is out of range", param=f"options.{k}")
        try:
            self.sampling = Sampling(**{k: opts[k] for k in _SAMPLING if k in opts})
        except ValidationError as exc:
            e = exc.errors()[0]
            loc = ".".join(str(x) for x in e["loc"])
            raise BadRequest(f"invalid value for options.{loc}: {e['msg']}",
                             param=f"options.{loc}") from exc
        n = opts.get("num_predict")
        if n is not None and n < 1 and n not in (-1, -2):
            raise BadRequest("num_predict must be a positive number of tokens, -1 "
                             "(no limit) or -2 (fill the context)", param="options.num_predict")
        # -1 and -2: until the model stops or its context is full, as Ollama
        self.max_tokens = limit_tokens(n if n is not None and n > 0 else None,
                                       param="options.num_predict")
        stop = opts.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("option 'stop' must be a list of strings", param="options.stop")
        self.stop = tuple(s for s in stop if s)
        self.num_ctx = opts.get("num_ctx")
        if self.num_ctx is not None and self.num_ctx < 1:
            raise BadRequest("num_ctx must be positive", param="options.num_ctx")

    def check_context(self, model_id: str) -> None:
        """num_ctx is honoured when the model's window (per request) is at least as large:
        a request that fits num_ctx fits the model. A larger ask is a 400."""
        if self.num_ctx is None:
            return
        ctx = _context_length(model_id)
        if ctx and self.num_ctx > ctx:
            raise BadRequest(f"num_ctx {self.num_ctx} is larger than the context of "
                             f"'{model_id}' on this mesh ({ctx} tokens per request)",
                             param="options.num_ctx", code="unsupported_parameter")


def _context_length(model_id: str) -> int | None:
    svc = services()
    w = svc.pool.find(model_id)
    if w is not None and w.info.get("ctx"):
        return int(w.info["ctx"])
    for node in svc.status()["nodes"][1:]:
        for m in node.get("models", []):
            if model_id in (m.get("id"), *(m.get("aliases") or ())) and m.get("ctx"):
                return int(m["ctx"])
    return None


def _format(fmt: str | dict[str, Any] | None):
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return json_constraint(None)
    if isinstance(fmt, dict):
        return json_constraint(fmt, param="format")
    raise BadRequest("format must be \"json\" or a JSON schema", param="format")


def _logprobs(req: _Generation) -> int | None:
    if not req.logprobs:
        if req.top_logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return req.top_logprobs or 0


def _lp(lps: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
             "top_logprobs": [{"token": x.token, "logprob": x.logprob, "bytes": list(x.bytes)}
                              for x in t.top]} for t in lps]


def _common_refusals(req: _Generation) -> None:
    _refuse("think", req.think, "no model of this mesh has a thinking mode")


# --------------------------------------------------------- local models
class _Clock:
    """One request's clock (time.perf_counter_ns) for Ollama's duration fields."""

    def __init__(self) -> None:
        self.start = time.perf_counter_ns()
        self.load = 0
        self.sent = self.first = self.start

    def stats(self, prompt_tokens: int, eval_tokens: int | None = None) -> dict[str, int]:
        end = time.perf_counter_ns()
        out = {"total_duration": end - self.start, "load_duration": self.load,
               "prompt_eval_count": prompt_tokens}
        if eval_tokens is not None:
            out.update(prompt_eval_duration=self.first - self.sent, eval_count=eval_tokens,
                       eval_duration=end - self.first)
        return out


async def _prepare(name: str, keep: float | None, clock: _Clock) -> tuple[str, str | None]:
    """(the model id to ask the router for, the local model's id or None): a model installed
    here is loaded now if it is not (the load counts as load_duration)."""
    svc = services()
    t0 = time.perf_counter_ns()
    local = await svc.keepalive.prepare(name, "llama")
    clock.load = time.perf_counter_ns() - t0
    if local is None:
        try:
            svc.router.plan(name, kind="generate")     # a peer serves it (400 if not text)
        except ModelNotFound:
            raise ModelNotFound(f"model '{name}' not found: it is neither installed on this "
                                "node nor served by the mesh; try pulling it first (/api/pull)",
                                param="model", code="model_not_found") from None
        if keep is not None:
            raise BadRequest(
                f"keep_alive applies to models this node serves itself; '{name}' is served "
                "by a mesh peer, which keeps it loaded as its own configuration says: remove "
                "keep_alive, or install the model here (/api/pull)", param="keep_alive",
                code="unsupported_parameter")
    return local or name, local


async def _load_or_unload(model: str, keep: float | None, key: str, empty: Any) -> Response:
    """An empty `messages` / `prompt`: load the model, or with keep_alive 0 unload it."""
    svc = services()
    name = _name(model)
    if keep == 0:
        local = svc.keepalive.loaded(name)
        if local is not None:
            await svc.keepalive.unload(local)
        elif svc.store.get(name) is None:
            await _prepare(name, keep, _Clock())     # 404, or the 400 for a peer's model
        reason = "unload"
    else:
        _, local = await _prepare(name, keep, _Clock())
        if local is not None:
            async with svc.keepalive.hold(local, keep):
                pass
        reason = "load"
    return json_response({"model": model, "created_at": _now(), key: empty, "done": True,
                          "done_reason": reason}, headers=node_headers())


def _ndjson(lines: AsyncIterator[dict[str, Any]], headers: dict[str, str]) -> Response:
    async def body() -> AsyncIterator[bytes]:
        async for obj in lines:
            yield json.dumps(obj, separators=(",", ":")).encode() + b"\n"

    resp = Response(body(), mimetype=NDJSON, headers={"Cache-Control": "no-cache",
                                                      "X-Accel-Buffering": "no", **headers})
    resp.timeout = None
    return resp


_DONE_REASON = {"tool_calls": "stop"}


async def _run(model: str, gen: Generate, opts: _Options, keep: float | None, clock: _Clock,
               *, stream: bool, chat: bool) -> Response:
    """Open the generation (on the local model, loaded if need be, held for keep_alive) and
    answer as Ollama: NDJSON lines, or one object."""
    svc = services()
    target, local = await _prepare(_name(model), keep, clock)
    opts.check_context(target)
    stack = contextlib.AsyncExitStack()
    try:
        if local is not None:
            await stack.enter_async_context(svc.keepalive.hold(local, keep))
        clock.sent = time.perf_counter_ns()
        call = await open_call(gen.model_copy(update={"model": target}))
        clock.first = time.perf_counter_ns()
        stack.push_async_callback(call.aclose)
    except BaseException:
        await stack.aclose()
        raise

    def obj(text: str, calls=(), lps=(), done: Done | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": _now()}
        if chat:
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                msg["tool_calls"] = [_tool_call(c, i) for i, c in enumerate(calls)]
            out["message"] = msg
        else:
            out["response"] = text
        if lps:
            out["logprobs"] = _lp(lps)
        out["done"] = done is not None
        if done is not None:
            out["done_reason"] = _DONE_REASON.get(done.finish_reason, done.finish_reason)
            out.update(clock.stats(done.usage.prompt_tokens, done.usage.completion_tokens))
        return out

    if not stream:
        async with stack:
            got = await collect(call)
        done = Done(finish_reason=got.finish_reason, usage=got.usage)
        return json_response(obj(got.text, got.tool_calls, got.logprobs if gen.logprobs is not None
                                 else (), done), headers=node_headers(call))

    async def lines() -> AsyncIterator[dict[str, Any]]:
        async with stack:           # closes the call, then releases the keep_alive hold
            async for ev in call.events():
                if isinstance(ev, Delta) and (ev.text or ev.tool_calls or ev.logprobs):
                    yield obj(ev.text, ev.tool_calls, ev.logprobs)
                elif isinstance(ev, Done):
                    yield obj("", done=ev)
                elif isinstance(ev, Failed):
                    yield {"error": error_from_failed(ev).message}

    return _ndjson(lines(), node_headers(call))


# -------------------------------------------------------------- chat / generate
def _tool_call(c: ToolCall, index: int) -> dict[str, Any]:
    try:
        args = json.loads(c.arguments) if c.arguments else {}
    except ValueError:
        args = c.arguments            # the backend's parse gave text: pass it on as it is
    return {"id": c.id, "function": {"index": index, "name": c.name, "arguments": args}}


def _tools(raw: list[dict[str, Any]] | None) -> tuple[Tool, ...]:
    tools = []
    for i, t in enumerate(raw or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': "
                             "{'name': ..., 'parameters': ...}}", param=f"tools[{i}]")
        tools.append(function_tool(fn.get("name"), fn.get("description"), fn.get("parameters"),
                                   f"tools[{i}].function"))
    return tuple(tools)


def _messages(raw: list[OllamaMessage]) -> tuple[Message, ...]:
    """Ollama's history as the wire's: assistant tool_calls get ids (Ollama's have none),
    and each tool result answers the oldest open call (of its tool_name, when given)."""
    out: list[Message] = []
    open_calls: list[ToolCall] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        _refuse(f"{where}.images", m.images, "no model of this mesh takes images")
        _refuse(f"{where}.thinking", m.thinking, "no model of this mesh has a thinking mode")
        calls = []
        for j, c in enumerate(m.tool_calls or []):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise BadRequest(f"{where}.tool_calls[{j}] needs a function with a name",
                                 param=f"{where}.tool_calls")
            args = fn.get("arguments", {})
            calls.append(ToolCall(id=str(c.get("id") or f"call_{i}_{j}"), name=fn["name"],
                                  arguments=args if isinstance(args, str) else json.dumps(args)))
        call_id = m.tool_call_id
        if m.role == "tool" and call_id is None and open_calls:
            match = next((c for c in open_calls if c.name == m.tool_name), open_calls[0])
            call_id = match.id
        if call_id is not None:
            open_calls = [c for c in open_calls if c.id != call_id]
        open_calls += calls
        out.append(Message(role=m.role, content=m.content or "", tool_calls=tuple(calls),
                           name=m.tool_name if m.role == "tool" else None,
                           tool_call_id=call_id if m.role == "tool" else None))
    return tuple(out)


@bp.post("/api/chat")
async def chat():
    clock = _Clock()
    req = await json_body(ChatBody, example=' like {"model": "smollm2", "messages": [...]}')
    _common_refusals(req)
    keep = _keep_alive(req.keep_alive)
    opts = _Options(req.options)
    if not req.messages:
        return await _load_or_unload(req.model, keep, "message",
                                     {"role": "assistant", "content": ""})
    tools = _tools(req.tools)
    gen = Generate(model=_name(req.model), messages=_messages(req.messages),
                   max_tokens=opts.max_tokens, stop=opts.stop, sampling=opts.sampling,
                   response_format=_format(req.format), logprobs=_logprobs(req), tools=tools,
                   tool_choice=check_tool_choice("auto" if tools else "none", tools, "tools"))
    return await _run(req.model, gen, opts, keep, clock, stream=req.stream, chat=True)


@bp.post("/api/generate")
async def generate():
    clock = _Clock()
    req = await json_body(GenerateBody, example=' like {"model": "smollm2", "prompt": "..."}')
    _common_refusals(req)
    _refuse("suffix", req.suffix, "fill-in-the-middle is not served")
    _refuse("images", req.images, "no model of this mesh takes images")
    _refuse("template", req.template, "the model's own chat template is always used (or "
            "none, with raw: true)")
    _refuse("context", req.context, "this node returns no token context; send the "
            "conversation to /api/chat instead")
    if req.raw and req.system:
        raise BadRequest("'system' has no effect with raw: true (no template is applied)",
                         param="system")
    keep = _keep_alive(req.keep_alive)
    opts = _Options(req.options)
    if not req.prompt:
        return await _load_or_unload(req.model, keep, "response", "")
    if req.raw:
        inputs: dict[str, Any] = {"prompt": req.prompt}
    else:
        msgs = [Message(role="system", content=req.system)] if req.system else []
        inputs = {"messages": (*msgs, Message(role="user", content=req.prompt))}
    gen = Generate(model=_name(req.model), **inputs, max_tokens=opts.max_tokens,
                   stop=opts.stop, sampling=opts.sampling, response_format=_format(req.format),
                   logprobs=_logprobs(req))
    return await _run(req.model, gen, opts, keep, clock, stream=req.stream, chat=False)


# ------------------------------------------------------------------- embeddings
async def _embed(model: str, inputs: list[str], keep: float | None, opts: _Options,
                 clock: _Clock, truncate: bool) -> tuple[list[list[float]], int, Call | None]:
    svc = services()
    target, local = await _prepare(_name(model), keep, clock)
    opts.check_context(target)
    if not inputs:
        return [], 0, None
    async with contextlib.AsyncExitStack() as stack:
        if local is not None:
            await stack.enter_async_context(svc.keepalive.hold(local, keep))
        try:
            res, call = await result(Embed(model=target, inputs=tuple(inputs)))
        except BadRequest as exc:
            if exc.code == "context_length_exceeded" and truncate:
                raise BadRequest(f"{exc.message}; this node does not truncate inputs "
                                 "(truncate: true): shorten it, or split it", param="truncate",
                                 code="context_length_exceeded") from exc
            raise
    return res["data"], int(res.get("prompt_tokens") or 0), call


@bp.post("/api/embed")
async def embed():
    clock = _Clock()
    req = await json_body(EmbedBody, example=' like {"model": "smollm2", "input": "..."}')
    keep = _keep_alive(req.keep_alive)
    opts = _Options(req.options)      # checked; sampling options change no embedding
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    vectors, n, call = await _embed(req.model, inputs, keep, opts, clock, req.truncate)
    if req.dimensions is not None and vectors:
        if req.dimensions > len(vectors[0]):
            raise BadRequest(f"dimensions must be between 1 and {len(vectors[0])}",
                             param="dimensions")
        cut = np.asarray(vectors, dtype=np.float32)[:, : req.dimensions]
        cut /= np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
        vectors = cut.tolist()
    return json_response({"model": req.model, "embeddings": vectors, **clock.stats(n)},
                         headers=node_headers(call))


@bp.post("/api/embeddings")
async def embeddings():
    clock = _Clock()
    req = await json_body(EmbeddingsBody, example=' like {"model": "smollm2", "prompt": "..."}')
    keep = _keep_alive(req.keep_alive)
    opts = _Options(req.options)
    vectors, _, call = await _embed(req.model, [req.prompt] if req.prompt else [], keep, opts,
                                    clock, truncate=False)
    return json_response({"embedding": vectors[0] if vectors else []},
                         headers=node_headers(call))


# ------------------------------------------------------------------ models
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
               15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 24: "IQ2_XXS",
               30: "IQ4_XS", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0"}


_FORMATS = {"llama": "gguf", "whisper": "ctranslate2", "piper": "onnx"}


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


def _details(installed, meta: dict[str, Any]) -> dict[str, Any]:
    backend = installed.backend if installed is not None else "llama"
    if backend != "llama":
        return {"parent_model": "", "format": _FORMATS.get(backend, backend), "family": backend,
                "families": [backend], "parameter_size": "", "quantization_level":
                str((installed.config or {}).get("compute_type", ""))}
    arch = meta.get("general.architecture", "")
    count = meta.get("general.parameter_count")
    size = _params(int(count)) if count else str(meta.get("general.size_label", ""))
    ftype = meta.get("general.file_type")
    return {"parent_model": "", "format": "gguf", "family": arch,
            "families": [arch] if arch else None, "parameter_size": size,
            "quantization_level": _FILE_TYPES.get(ftype, str(ftype or ""))}


def _digest(installed) -> str:
    """The sha256 of the file the backend opens (the first file of a directory model)."""
    files = installed.files
    main = next((f for f in files if f.path == installed.path.name), files[0] if files else None)
    return (main.sha256 or "") if main is not None else ""


def _entry(installed=None, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model as /api/tags lists it: installed here, or only served by a peer (then from
    this node's gallery index, when it has the entry)."""
    svc = services()
    if installed is not None:
        manifest = installed.dir / "model.yaml"
        return {"name": _tag(installed.id), "model": _tag(installed.id),
                "modified_at": _iso(manifest.stat().st_mtime), "size": installed.size_bytes,
                "digest": _digest(installed),
                "details": _details(installed, svc.model_metadata(installed))}
    assert card is not None
    entry = svc.index.get(card["id"])
    files = entry.files if entry is not None else []
    backend = entry.backend if entry is not None else "llama"
    return {"name": _tag(card["id"]), "model": _tag(card["id"]),
            "modified_at": _iso(card.get("created") or time.time()),
            "size": sum(f.size or 0 for f in files),
            "digest": files[0].sha256 or "" if len(files) == 1 else "",
            "details": {"parent_model": "", "format": _FORMATS.get(backend, backend),
                        "family": backend if entry is not None else "",
                        "families": None, "parameter_size": "", "quantization_level": ""}}


@bp.get("/api/tags")
async def tags():
    svc = services()
    installed = {m.id: m for m in svc.store.list()}
    models = [_entry(m) for m in installed.values()]
    models += [_entry(card=c) for c in svc.router.model_cards() if c["id"] not in installed]
    return json_response({"models": models}, headers=node_headers())


@bp.get("/api/ps")
async def ps():
    svc = services()
    gpu = bool(svc.self_status()["memory"]["gpus"])
    out = []
    for m in svc.keepalive.running():
        installed = svc.store.get(m["id"])
        size = m["resident_bytes"] or (installed.size_bytes if installed else 0)
        exp = m["expires_at"]
        out.append({"name": _tag(m["id"]), "model": _tag(m["id"]), "size": size,
                    "digest": _digest(installed) if installed else "",
                    "details": _details(installed, svc.model_metadata(installed)
                                        if installed else {}),
                    "expires_at": _iso(exp) if exp is not None and exp < FOREVER_TS
                    else FOREVER,
                    # llama offloads every layer to a GPU unless gpu_layers says otherwise
                    "size_vram": size if gpu and m["backend"] == "llama"
                    and m["gpu_layers"] in (None, -1) else 0,
                    "context_length": m["ctx"] or 0})
    return json_response({"models": out}, headers=node_headers())


def _installed_or_404(name: str):
    installed = services().store.get(_name(name))
    if installed is None:
        raise NotFound(f"model '{name}' not found", param="model", code="model_not_found")
    return installed


@bp.post("/api/show")
async def show():
    svc = services()
    req = await json_body(ShowBody, example=' like {"model": "smollm2"}')
    _refuse("verbose", req.verbose, "the tokenizer's arrays are not kept")
    name = _name(req.target())
    installed = svc.store.get(name)
    if installed is None:        # served by a peer: what this node's gallery index says
        card = next((c for c in svc.router.model_cards() if c["id"] == name), None)
        if card is None:
            raise NotFound(f"model '{req.target()}' not found", param="model",
                           code="model_not_found")
        entry = svc.index.get(name)
        sampling = entry.config.sampling.model_dump(exclude_none=True) if entry else {}
        caps = ["completion", "tools"] if entry is None or entry.backend == "llama" else []
        return json_response({
            "modelfile": "", "parameters": _parameters(sampling, None), "template": "",
            "license": entry.license if entry is not None else "",
            "details": _entry(card=card)["details"], "model_info": {},
            "capabilities": caps, "modified_at": _iso(card.get("created") or time.time())},
            headers=node_headers())
    meta = svc.model_metadata(installed)
    config = installed.config or {}
    template = config.get("chat_template") or meta.get("tokenizer.chat_template", "")
    ctx = config.get("context_size")
    caps = []
    if installed.backend == "llama":
        caps = ["completion", "tools"] + (["embedding"] if config.get("embeddings", True) else [])
    entry = svc.index.get(installed.id)
    params = _parameters(dict(config.get("sampling") or {}), ctx)
    modelfile = (f"# Modelfile of {installed.id} on this node (inference-mesh)\n"
                 f"FROM {installed.path}\n"
                 + "".join(f"PARAMETER {line}\n" for line in params.splitlines()))
    return json_response({
        "modelfile": modelfile, "parameters": params, "template": template,
        "license": entry.license if entry is not None else "",
        "details": _details(installed, meta),
        "model_info": {k: v for k, v in meta.items() if k != "tokenizer.chat_template"},
        "capabilities": caps,
        "modified_at": _iso((installed.dir / "model.yaml").stat().st_mtime)},
        headers=node_headers())


def _parameters(sampling: dict[str, Any], ctx: int | None) -> str:
    items = sorted(sampling.items()) + ([("num_ctx", ctx)] if ctx else [])
    return "\n".join(f"{k:<30} {v}" for k, v in items)


@bp.post("/api/pull")
async def pull():
    svc = services()
    req = await json_body(PullBody, example=' like {"model": "smollm2"}')
    _refuse("insecure", req.insecure, "models come from this mesh's gallery, whose sources "
            "are always verified (pinned sha256)")
    entry = resolve(svc.index, _name(req.target()))
    job = svc.jobs.start(entry, load=False)
    digests = {f.path: (f"sha256:{f.sha256}" if f.sha256 else f.path) for f in entry.files}
    sizes = {f.path: f.size for f in entry.files}

    async def lines() -> AsyncIterator[dict[str, Any]]:
        """Ollama's progress: pulling manifest, downloading <digest> (total, completed)...,
        verifying sha256 digest, writing manifest, success; or a final error."""
        yield {"status": "pulling manifest"}
        reported: set[str] = set()
        last = None
        while True:
            changed = job.changed
            path = (job.file or "").split(" (part ")[0]
            line: dict[str, Any] | None = None
            if job.state == "downloading" and path in digests:
                reported.add(path)
                line = {"status": f"downloading {digests[path]}", "digest": digests[path],
                        "total": job.bytes_total or sizes[path] or 0,
                        "completed": job.bytes_done}
            elif job.state == "verifying":
                line = {"status": "verifying sha256 digest"}
            if line is not None and line != last:
                last = line
                yield line
            if job.state == "failed":
                yield {"error": job.error or "the install failed"}
                return
            if job.state == "done":
                for path in digests.keys() - reported:     # already here: nothing to fetch
                    size = sizes[path] or 0
                    yield {"status": f"downloading {digests[path]}", "digest": digests[path],
                           "total": size, "completed": size}
                yield {"status": "writing manifest"}
                yield {"status": "success"}
                return
            await changed.wait()

    if req.stream:
        return _ndjson(lines(), node_headers())
    async for line in lines():
        if "error" in line:
            raise GalleryError(line["error"])
    return json_response({"status": "success"}, headers=node_headers())


@bp.delete("/api/delete")
async def delete():
    svc = services()
    req = await json_body(DeleteBody, example=' like {"model": "smollm2"}')
    installed = _installed_or_404(req.target())
    if svc.keepalive.loaded(installed.id) is not None:
        await svc.keepalive.unload(installed.id)     # Ollama deletes loaded models too
    svc.store.remove(installed.id)
    return Response(b"", status=200, headers=node_headers())


@bp.get("/api/version")
async def version():
    return json_response({"version": VERSION}, headers=node_headers())


__all__ = ["bp", "ChatBody", "GenerateBody", "EmbedBody", "EmbeddingsBody", "ShowBody",
           "PullBody", "DeleteBody"]
