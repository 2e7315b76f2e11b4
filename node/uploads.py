"""Uploaded files of OpenAI's Files API (`/v1/files`): kept on the node that took them,
readable from any node of the mesh.

`<home>/files/` holds one blob per file (named by its id) and `files.db` (SQLite, WAL)
its metadata: id, owner (the API key id that uploaded it; None on a mesh without keys),
filename, purpose, size, creation time. Batch output and error files (node/batches.py)
are written here too, owned by the batch's key, purpose `batch_output`.

Ids name their holder (mesh/records.py ``make_id``: ``file-<peer id>_<hex>``); ``meta``,
``content`` and ``remove`` answer for an id of this node from the table and ask the holder
of any other over `/mesh/records/1` (kinds "file" and "file_content"; a file's content
travels in one frame, so the upload limit stays under mesh/wire/framing.py MAX_FRAME).
Who may read: a file with an owner is visible to that key only (any other key gets the
same NotFound as for a missing file); an ownerless file to anyone.

A blob is written to a temporary name and renamed once whole, then the row is inserted:
a crash never leaves a row without its bytes. SQLite calls and file I/O run in a worker
thread (one connection, one lock).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import trio

from mesh.errors import NotFound
from mesh.records import RecordClient, make_id, owner_of

__all__ = ["FileStore", "PREFIX", "KIND", "CONTENT_KIND"]

PREFIX = "file-"
KIND, CONTENT_KIND = "file", "file_content"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, key_id TEXT, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS files_created ON files (created_at);
"""


def visible(owner_key: str | None, caller: dict[str, Any] | None) -> bool:
    """May `caller` see a record owned by `owner_key`?"""
    return owner_key is None or (caller is not None and caller.get("key_id") == owner_key)


def key_of(caller: dict[str, Any] | None) -> str | None:
    return caller.get("key_id") if caller else None


def file_object(row: tuple) -> dict[str, Any]:
    fid, _, filename, purpose, size, created = row
    return {"id": fid, "object": "file", "bytes": size, "created_at": created,
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None}


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.node_id: str | None = None
        self.client: RecordClient | None = None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(root / "files.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for stale in root.glob("*.part"):        # an upload a crash interrupted
            stale.unlink()

    def join(self, node_id: str, client: RecordClient) -> None:
        self.node_id, self.client = node_id, client

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ blocking parts
    def _blob(self, fid: str) -> Path:
        return self.root / fid

    def put_sync(self, data: bytes, filename: str, purpose: str, key_id: str | None) -> dict:
        fid = make_id(PREFIX, self.node_id)
        part = self.root / f"{fid}.part"
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, self._blob(fid))
        row = (fid, key_id, filename, purpose, len(data), int(time.time()))
        with self._lock:
            self._db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)", row)
        return file_object(row)

    def _row(self, fid: str, caller: dict[str, Any] | None) -> tuple | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ?", (fid,)).fetchone()
        return row if row is not None and visible(row[1], caller) else None

    def _meta(self, fid: str, caller) -> dict[str, Any] | None:
        row = self._row(fid, caller)
        return file_object(row) if row else None

    def _content(self, fid: str, caller) -> bytes | None:
        row = self._row(fid, caller)
        return self._blob(fid).read_bytes() if row else None

    def _delete(self, fid: str, caller) -> bool:
        if self._row(fid, caller) is None:
            return False
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id = ?", (fid,))
        self._blob(fid).unlink(missing_ok=True)
        return True

    def _list(self, caller, purpose: str | None, after: str | None, limit: int,
              order: str) -> tuple[list[dict[str, Any]], bool]:
        sql = "SELECT * FROM files"
        with self._lock:
            rows = self._db.execute(sql + f" ORDER BY created_at {order}, id {order}").fetchall()
        rows = [r for r in rows if visible(r[1], caller) and purpose in (None, r[3])]
        if after is not None:
            ids = [r[0] for r in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else []
        return [file_object(r) for r in rows[:limit]], len(rows) > limit

    # -------------------------------------------------- records source (this node)
    async def put(self, data: bytes, filename: str, purpose: str, key_id: str | None) -> dict:
        return await trio.to_thread.run_sync(self.put_sync, data, filename, purpose, key_id)

    async def get(self, fid: str, caller) -> dict[str, Any] | None:
        return await trio.to_thread.run_sync(self._meta, fid, caller)

    async def delete(self, fid: str, caller) -> bool:
        return await trio.to_thread.run_sync(self._delete, fid, caller)

    async def list(self, caller, *, purpose: str | None = None, after: str | None = None,
                   limit: int = 10000, order: str = "desc") -> tuple[list[dict], bool]:
        """This node's files the caller may see (files live where they were uploaded:
        the list is this node's, as each node answers for its own uploads)."""
        return await trio.to_thread.run_sync(self._list, caller, purpose, after, limit,
                                             "ASC" if order == "asc" else "DESC")

    class Content:
        """The records source of kind "file_content": a file's bytes."""

        def __init__(self, store: "FileStore") -> None:
            self.store = store

        async def get(self, fid: str, caller) -> dict[str, Any] | None:
            data = await trio.to_thread.run_sync(self.store._content, fid, caller)
            return None if data is None else {"content": data}

        async def delete(self, fid: str, caller) -> bool:
            return False

    # ------------------------------------------------------------------ mesh-wide
    def _holder(self, fid: str) -> str | None:
        owner = owner_of(PREFIX, fid)
        return None if owner in (None, self.node_id) or self.client is None else owner

    async def meta(self, fid: str, caller) -> dict[str, Any]:
        holder = self._holder(fid)
        found = (await self.client.get(holder, KIND, fid, caller) if holder
                 else await self.get(fid, caller))
        if found is None:
            raise NotFound(f"No such File object: {fid}", param="file_id")
        return found

    async def content(self, fid: str, caller) -> bytes:
        holder = self._holder(fid)
        if holder:
            return bytes((await self.client.get(holder, CONTENT_KIND, fid, caller))["content"])
        data = await trio.to_thread.run_sync(self._content, fid, caller)
        if data is None:
            raise NotFound(f"No such File object: {fid}", param="file_id")
        return data

    async def remove(self, fid: str, caller) -> None:
        holder = self._holder(fid)
        if holder:
            await self.client.delete(holder, KIND, fid, caller)
        elif not await self.delete(fid, caller):
            raise NotFound(f"No such File object: {fid}", param="file_id")
