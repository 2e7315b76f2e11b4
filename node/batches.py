"""OpenAI's Batch API (`/v1/batches`): durable batches, their lines spread over the mesh
at low priority.

Design notes
------------
State. `<home>/batches.db` (SQLite, WAL) holds one row per batch (status, timestamps,
counts, the creator's caller: key id, name, features) and one row per input line (its
custom_id, body, and once run its status code and response body). A line's result is
committed the moment it arrives, so a node killed at any point (kill -9 included)
resumes at restart with the lines still pending: a finished line is never run again,
and a line that was in flight when the node died runs again (its first answer was never
recorded, so it is in the output once).

Status machine (OpenAI's): validating -> in_progress -> finalizing -> completed; a batch
whose input is bad fails in validating (`errors` names each bad line: bad JSON, missing
or duplicate custom_id, a method or url other than the batch's, a body without a
model, a model the mesh does not serve); `cancel` -> cancelling -> cancelled (lines in
flight are cancelled, only finished lines are in the output); past `expires_at`
(completion_window, 24h) -> expired. Output and error files follow OpenAI's line format,
one line per input line, in input order: a 2xx answer in the output file, any other
status in the error file with its error body, and a line that never ran (cancelled,
expired) in the error file with `error.code` batch_cancelled / batch_expired.

Dispatch. Each line runs through the same code as its HTTP route (`run_line`, which the
composition root makes from api/lines.py `answer`: validation, the router, a peer
or this node's workers), as the key that made the batch and marked background
(`Generate.background`): a worker admits interactive requests first, and a background
one never takes a model's last free slot (node/backends/batching.py). How many lines of
one model are in flight at once is the mesh's capacity for it (`Router.capacity`: over
every node serving it, its slots minus the one kept free), re-read before each line, so
a node that joins takes lines and one that leaves stops getting them. A line that fails
with a mesh error (502/503/504: a peer died mid-line, nobody free) is retried up to
RETRIES times, elsewhere if the router so decides, before its error is recorded.

Limits (node/config.py): active batches per key, lines per batch.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from mesh.errors import BadRequest, Conflict, MeshError, NotFound, RateLimited
from mesh.records import RecordClient, make_id, owner_of
from node.uploads import FileStore, key_of, visible

__all__ = ["Batches", "PREFIX", "KIND", "ENDPOINTS"]

log = logging.getLogger("node.batches")

PREFIX, KIND = "batch_", "batch"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
WINDOWS = {"24h": 86400}
RETRIES = 2                 # extra tries of a line that failed with a 502/503/504
RETRY_STATUSES = (502, 503, 504)
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_STAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
           "cancelling_at", "cancelled_at")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, key_id TEXT, caller TEXT, endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL, metadata TEXT,
    status TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, errors TEXT);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, n INTEGER NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, status_code INTEGER, response TEXT,
    PRIMARY KEY (batch_id, n));
"""

# (endpoint, body, caller) -> (status, body): one line through the API (node/daemon.py)
RunLine = Callable[[str, dict[str, Any], dict[str, Any] | None],
                   Awaitable[tuple[int, dict[str, Any]]]]


class Batches:
    def __init__(self, path: Path, files: FileStore, *, run_line: RunLine,
                 capacity: Callable[[str], int], check_model: Callable[[str, str], None],
                 authorized: Callable[[dict[str, Any] | None], bool],
                 max_active_per_key: int = 4, max_lines: int = 50_000) -> None:
        self.files = files
        self.run_line, self.capacity = run_line, capacity
        self.check_model, self.authorized = check_model, authorized
        self.max_active, self.max_lines = max_active_per_key, max_lines
        self.node_id: str | None = None
        self.client: RecordClient | None = None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._send, self._recv = trio.open_memory_channel[str](1000)
        self._scopes: dict[str, trio.CancelScope] = {}

    def join(self, node_id: str, client: RecordClient) -> None:
        self.node_id, self.client = node_id, client

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ SQL
    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _row(self, bid: str) -> dict[str, Any] | None:
        with self._lock:
            cur = self._db.execute("SELECT * FROM batches WHERE id = ?", (bid,))
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        return dict(zip(names, row)) if row else None

    def _set(self, bid: str, **cols: Any) -> None:
        keys = ", ".join(f"{k} = ?" for k in cols)
        self._q(f"UPDATE batches SET {keys} WHERE id = ?", (*cols.values(), bid))

    def _move(self, bid: str, status: str, **cols: Any) -> None:
        stamp = f"{status}_at"
        extra = {stamp: int(time.time())} if stamp in _STAMPS else {}
        self._set(bid, status=status, **extra, **cols)

    def _object(self, b: dict[str, Any]) -> dict[str, Any]:
        counts = self._q("SELECT COUNT(*), SUM(done AND status_code BETWEEN 200 AND 299), "
                         "SUM(done AND NOT (status_code BETWEEN 200 AND 299)) FROM lines "
                         "WHERE batch_id = ?", (b["id"],))[0]
        return {"id": b["id"], "object": "batch", "endpoint": b["endpoint"],
                "errors": json.loads(b["errors"]) if b["errors"] else None,
                "input_file_id": b["input_file_id"],
                "completion_window": b["completion_window"], "status": b["status"],
                "output_file_id": b["output_file_id"], "error_file_id": b["error_file_id"],
                "created_at": b["created_at"], "expires_at": b["expires_at"],
                **{k: b[k] for k in _STAMPS},
                "request_counts": {"total": counts[0] or 0, "completed": counts[1] or 0,
                                   "failed": counts[2] or 0},
                "metadata": json.loads(b["metadata"]) if b["metadata"] else None}

    # ---------------------------------------------------------------- the API
    async def create(self, caller: dict[str, Any] | None, *, input_file_id: str,
                     endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}",
                             param="endpoint", code="invalid_value")
        if completion_window not in WINDOWS:
            raise BadRequest("completion_window must be '24h'", param="completion_window",
                             code="invalid_value")
        meta = await self.files.meta(input_file_id, caller)
        if meta["purpose"] != "batch":
            raise BadRequest(f"file {input_file_id} has purpose {meta['purpose']!r}; a "
                             "batch's input file needs purpose 'batch'", param="input_file_id")
        key = key_of(caller)
        active = self._q(f"SELECT COUNT(*) FROM batches WHERE key_id IS ? AND status IN "
                         f"({','.join('?' * len(ACTIVE))})", (key, *ACTIVE))[0][0]
        if self.max_active and active >= self.max_active:
            raise RateLimited(f"this key already has {active} active batches (the limit is "
                              f"{self.max_active}); wait for one to end", code="batch_limit")
        bid = make_id(PREFIX, self.node_id)
        now = int(time.time())
        self._q("INSERT INTO batches (id, key_id, caller, endpoint, input_file_id, "
                "completion_window, metadata, status, created_at, expires_at) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, 'validating', ?, ?)",
                (bid, key, json.dumps(caller), endpoint, input_file_id, completion_window,
                 json.dumps(metadata) if metadata is not None else None, now,
                 now + WINDOWS[completion_window]))
        self._send.send_nowait(bid)
        return self._object(self._row(bid))

    def _mine(self, bid: str, caller) -> dict[str, Any] | None:
        b = self._row(bid)
        return b if b is not None and visible(b["key_id"], caller) else None

    async def get(self, bid: str, caller) -> dict[str, Any] | None:
        """The batch object (the records source of kind "batch")."""
        b = self._mine(bid, caller)
        return self._object(b) if b else None

    async def delete(self, bid: str, caller) -> bool:
        """Over the mesh, "delete" of a batch record asks its holder to cancel it
        (batches themselves are never deleted, as OpenAI's)."""
        try:
            await self._cancel_here(bid, caller)
            return True
        except NotFound:
            return False

    async def retrieve(self, bid: str, caller) -> dict[str, Any]:
        holder = self._holder(bid)
        found = (await self.client.get(holder, KIND, bid, caller) if holder
                 else await self.get(bid, caller))
        if found is None:
            raise NotFound(f"No batch found with id '{bid}'", param="batch_id")
        return found

    async def cancel(self, bid: str, caller) -> dict[str, Any]:
        holder = self._holder(bid)
        if holder:
            await self.client.delete(holder, KIND, bid, caller)
            return await self.retrieve(bid, caller)
        return await self._cancel_here(bid, caller)

    async def _cancel_here(self, bid: str, caller) -> dict[str, Any]:
        b = self._mine(bid, caller)
        if b is None:
            raise NotFound(f"No batch found with id '{bid}'", param="batch_id")
        if b["status"] in ("validating", "in_progress"):
            self._move(bid, "cancelling")
            scope = self._scopes.get(bid)
            if scope is not None:
                scope.cancel()
        elif b["status"] not in ("cancelling", "cancelled"):
            raise Conflict(f"Cannot cancel a batch with status '{b['status']}'.",
                           code="batch_not_cancellable")
        return self._object(self._row(bid))

    def list(self, caller, *, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """This node's batches the caller may see, newest first."""
        rows = [r[0] for r in self._q("SELECT id, key_id FROM batches ORDER BY created_at "
                                      "DESC, id DESC") if visible(r[1], caller)]
        if after is not None:
            rows = rows[rows.index(after) + 1:] if after in rows else []
        return [self._object(self._row(b)) for b in rows[:limit]], len(rows) > limit

    def _holder(self, bid: str) -> str | None:
        owner = owner_of(PREFIX, bid)
        return None if owner in (None, self.node_id) or self.client is None else owner

    # ---------------------------------------------------------------- running
    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run every active batch (those left by a previous run first), then each new one."""
        async with trio.open_nursery() as nursery:
            for (bid,) in self._q(f"SELECT id FROM batches WHERE status IN "
                                  f"({','.join('?' * len(ACTIVE))}) ORDER BY created_at",
                                  ACTIVE):
                nursery.start_soon(self._drive, bid)
            task_status.started(self)
            async for bid in self._recv:
                nursery.start_soon(self._drive, bid)

    async def _drive(self, bid: str) -> None:
        try:
            b = self._row(bid)
            if b["status"] == "validating":
                await self._validate(b)
            b = self._row(bid)
            if b["status"] in ("in_progress", "cancelling"):
                await self._dispatch(b)
            b = self._row(bid)
            if b["status"] in ("finalizing", "cancelling") or (
                    b["status"] == "in_progress" and time.time() >= b["expires_at"]):
                await self._finalize(self._row(bid))
        except MeshError as exc:       # the input file vanished, the disk is full...
            log.warning("batch %s failed: %s", bid, exc.message)
            self._fail(bid, exc.message)
        except Exception as exc:       # a bug here must fail the batch, not the node
            log.exception("batch %s: internal error", bid)
            self._fail(bid, f"internal error: {type(exc).__name__}")

    def _fail(self, bid: str, message: str) -> None:
        self._move(bid, "failed", errors=json.dumps(_errors(
            [{"code": "batch_failed", "message": message, "line": None}])))

    async def _validate(self, b: dict[str, Any]) -> None:
        caller = json.loads(b["caller"])
        if self._q("SELECT 1 FROM batches WHERE id = ? AND status = 'cancelling'", (b["id"],)):
            return
        raw = await self.files.content(b["input_file_id"], caller)
        lines, errors, seen = [], [], set()
        for n, text in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not text.strip():
                continue
            err = self._check_line(text, n, b["endpoint"], seen)
            if isinstance(err, dict):
                errors.append(err)
            else:
                lines.append(err)
        if not lines and not errors:
            errors.append({"code": "empty_file", "message": "the input file has no lines",
                           "line": None})
        if len(lines) + len(errors) > self.max_lines:
            errors = [{"code": "too_many_lines", "message": f"the input file has "
                       f"{len(lines) + len(errors)} lines; the limit is {self.max_lines}",
                       "line": None}]
        if errors:
            self._move(b["id"], "failed", errors=json.dumps(_errors(errors[:1000])))
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO lines (batch_id, n, custom_id, body) "
                                 "VALUES (?, ?, ?, ?)",
                                 [(b["id"], n, cid, json.dumps(body)) for n, cid, body in lines])
            self._db.execute("UPDATE batches SET status = 'in_progress', in_progress_at = ? "
                             "WHERE id = ? AND status = 'validating'",
                             (int(time.time()), b["id"]))
            self._db.execute("COMMIT")

    def _check_line(self, text: str, n: int, endpoint: str, seen: set[str]):
        def bad(code: str, message: str, param: str | None = None) -> dict[str, Any]:
            return {"code": code, "message": message, "param": param, "line": n}
        try:
            obj = json.loads(text)
        except ValueError as exc:
            return bad("invalid_json_line", f"line {n} is not valid JSON: {exc}")
        if not isinstance(obj, dict):
            return bad("invalid_json_line", f"line {n} is not a JSON object")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            return bad("missing_required_parameter", f"line {n} has no custom_id", "custom_id")
        if cid in seen:
            return bad("duplicate_custom_id", f"line {n}: custom_id {cid!r} is used twice",
                       "custom_id")
        seen.add(cid)
        if obj.get("method", "POST") != "POST":
            return bad("invalid_value", f"line {n}: method must be POST", "method")
        if obj.get("url") != endpoint:
            return bad("invalid_url", f"line {n}: url {obj.get('url')!r} is not this batch's "
                       f"endpoint {endpoint}", "url")
        body = obj.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return bad("missing_required_parameter", f"line {n}: body needs a model", "body.model")
        try:
            self.check_model(body["model"], endpoint)
        except MeshError as exc:
            return bad("model_not_found", f"line {n}: {exc.message}", "body.model")
        return n, cid, body

    async def _dispatch(self, b: dict[str, Any]) -> None:
        bid, caller = b["id"], json.loads(b["caller"])
        limiters: dict[str, trio.CapacityLimiter] = {}
        deadline = trio.current_time() + max(0.0, b["expires_at"] - time.time())
        with trio.CancelScope(deadline=deadline) as scope:
            self._scopes[bid] = scope
            if self._row(bid)["status"] == "cancelling":
                scope.cancel()
            try:
                async with trio.open_nursery() as nursery:
                    for n, body in self._q("SELECT n, body FROM lines WHERE batch_id = ? AND "
                                           "NOT done ORDER BY n", (bid,)):
                        body = json.loads(body)
                        if not self.authorized(caller):
                            raise _Revoked()
                        lim = limiters.setdefault(body["model"], trio.CapacityLimiter(1))
                        lim.total_tokens = max(1, self.capacity(body["model"]))
                        token = object()        # the line's borrow of the limiter
                        await lim.acquire_on_behalf_of(token)
                        nursery.start_soon(self._line, bid, n, b["endpoint"], body, caller,
                                           lim, token)
            except _Revoked:
                self._move(bid, "failed", errors=json.dumps(_errors([{
                    "code": "key_revoked", "message": "the API key that created this batch "
                    "was revoked", "line": None}])))
                return
            finally:
                self._scopes.pop(bid, None)
        status = self._row(bid)["status"]
        if scope.cancelled_caught and status != "cancelling":
            return                      # expired: _drive finalizes it as such
        if status == "in_progress":
            self._move(bid, "finalizing")

    async def _line(self, bid: str, n: int, endpoint: str, body: dict[str, Any],
                    caller, lim: trio.CapacityLimiter, token: object) -> None:
        try:
            for attempt in range(RETRIES + 1):
                status, answer = await self.run_line(endpoint, body, caller)
                if status not in RETRY_STATUSES:
                    break
                log.info("batch %s line %d: %d, %s", bid, n, status,
                         "retrying" if attempt < RETRIES else "giving up")
            self._q("UPDATE lines SET done = 1, status_code = ?, response = ? WHERE "
                    "batch_id = ? AND n = ? AND NOT done", (status, json.dumps(answer), bid, n))
        finally:
            lim.release_on_behalf_of(token)

    async def _finalize(self, b: dict[str, Any]) -> None:
        bid, caller = b["id"], json.loads(b["caller"])
        ending = {"cancelling": "cancelled", "in_progress": "expired"}.get(b["status"],
                                                                            "completed")
        never = {"cancelled": ("batch_cancelled", "the batch was cancelled before this line "
                               "ran"),
                 "expired": ("batch_expired", "the batch expired before this line ran")}
        out, err = [], []
        for cid, done, status, response in self._q(
                "SELECT custom_id, done, status_code, response FROM lines WHERE batch_id = ? "
                "ORDER BY n", (bid,)):
            line = {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": cid}
            if done:
                line |= {"response": {"status_code": status,
                                      "request_id": secrets.token_hex(12),
                                      "body": json.loads(response)}, "error": None}
                (out if 200 <= status < 300 else err).append(line)
            else:
                code, message = never.get(ending, ("batch_failed", "this line did not run"))
                err.append(line | {"response": None,
                                   "error": {"code": code, "message": message}})
        key = key_of(caller)
        files = {}
        for col, lines, name in (("output_file_id", out, "output"),
                                 ("error_file_id", err, "errors")):
            if b[col] is None and lines:
                data = "".join(json.dumps(x) + "\n" for x in lines).encode()
                f = await self.files.put(data, f"{bid}_{name}.jsonl", "batch_output", key)
                files[col] = f["id"]
                self._set(bid, **{col: f["id"]})
        if ending == "completed" and b["status"] != "finalizing":
            self._move(bid, "finalizing")
        self._move(bid, ending)


class _Revoked(Exception):
    pass


def _errors(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": [{"param": None, **i} for i in items]}
