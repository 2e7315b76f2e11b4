"""Stored responses of OpenAI's Responses API: SQLite (WAL) under the node's home, read
mesh-wide.

A response is kept by the node the client talked to, in `<home>/responses.db`, one row
per response: its id, the creator's API key id (None on a mesh without keys), created
and expiry times (``response_retention_days``, 30 by default) and the record as JSON:

    {"response":    the Response object as the client got it,
     "input_items": this request's input items, each with its id,
     "context":     every item before them in the conversation (the previous responses'
                    inputs and outputs), so that a `previous_response_id` is rebuilt
                    from one record, in one hop, whichever node asks}

Ids name their holder (mesh/records.py ``make_id``: ``resp_<peer id>_<hex>``). ``fetch``
and ``remove`` serve an id of this node from the table and ask the holder of any other
over `/mesh/records/1`; the table's own ``get`` and ``delete`` are what that protocol
calls here (the records source of kind "response"). Who may read: when a row has a key
id, only a caller with the same key id; anyone else gets None, the same as "not there".

Expiry: rows past their time are never served, and are deleted when the store opens and
at every new row (one indexed DELETE). SQLite calls run in a worker thread (one
connection, one lock) so that a slow disk never stalls the node's event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import trio

from mesh.errors import NotFound
from mesh.records import RecordClient, make_id, owner_of

__all__ = ["KIND", "PREFIX", "ResponseStore"]

KIND = "response"
PREFIX = "resp_"
DAY = 86400.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, key_id TEXT, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);
"""


def _visible(owner_key: str | None, caller: dict[str, Any] | None) -> bool:
    return owner_key is None or (caller or {}).get("key_id") == owner_key


class ResponseStore:
    """The table, plus the mesh-wide view of it (``join`` gives it the mesh)."""

    def __init__(self, path: Path, *, retention_days: float = 30.0,
                 now: Callable[[], float] = time.time) -> None:
        self.retention_s = retention_days * DAY
        self.now = now
        self.node_id: str | None = None
        self.client: RecordClient | None = None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.purge()

    def join(self, node_id: str, client: RecordClient) -> None:
        """This node is `node_id` of a mesh: new ids name it, others are asked of their holder."""
        self.node_id, self.client = node_id, client

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def new_id(self) -> str:
        return make_id(PREFIX, self.node_id)

    # ------------------------------------------------------------ the table (blocking)
    def purge(self) -> int:
        """Delete expired rows; how many."""
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE expires_at <= ?",
                                    (self.now(),)).rowcount

    def _put(self, rid: str, record: dict[str, Any], key_id: str | None) -> None:
        now = self.now()
        with self._lock:
            self._db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (rid, key_id, now, now + self.retention_s, json.dumps(record)))

    def _row(self, rid: str, caller: dict[str, Any] | None) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT key_id, record FROM responses WHERE id = ? AND "
                                   "expires_at > ?", (rid, self.now())).fetchone()
        if row is None or not _visible(row[0], caller):
            return None
        return json.loads(row[1])

    def _delete(self, rid: str, caller: dict[str, Any] | None) -> bool:
        with self._lock:
            row = self._db.execute("SELECT key_id FROM responses WHERE id = ? AND "
                                   "expires_at > ?", (rid, self.now())).fetchone()
            if row is None or not _visible(row[0], caller):
                return False
            self._db.execute("DELETE FROM responses WHERE id = ?", (rid,))
            return True

    # ----------------------------------------------- this node's rows (records source)
    async def put(self, rid: str, record: dict[str, Any], key_id: str | None) -> None:
        await trio.to_thread.run_sync(self._put, rid, record, key_id)

    async def get(self, rid: str, caller: dict[str, Any] | None) -> dict[str, Any] | None:
        return await trio.to_thread.run_sync(self._row, rid, caller)

    async def delete(self, rid: str, caller: dict[str, Any] | None) -> bool:
        return await trio.to_thread.run_sync(self._delete, rid, caller)

    # ------------------------------------------------------------------- mesh-wide
    def _holder(self, rid: str) -> str | None:
        """The peer to ask for `rid` (``self.client`` is then set); None: this node."""
        owner = owner_of(PREFIX, rid)
        return None if owner in (None, self.node_id) or self.client is None else owner

    async def fetch(self, rid: str, caller: dict[str, Any] | None) -> dict[str, Any]:
        """The record of `rid` from whichever node holds it; NotFound if none may be seen."""
        holder = self._holder(rid)
        if holder is not None:
            return await self.client.get(holder, KIND, rid, caller)
        record = await self.get(rid, caller)
        if record is None:
            raise NotFound(f"no response with id {rid!r}")
        return record

    async def remove(self, rid: str, caller: dict[str, Any] | None) -> None:
        holder = self._holder(rid)
        if holder is not None:
            await self.client.delete(holder, KIND, rid, caller)
        elif not await self.delete(rid, caller):
            raise NotFound(f"no response with id {rid!r}")
