"""`<home>/agents.db` (SQLite, WAL): the definitions this node holds and the runs it made.

    agents  name -> the replicated AgentRecord (JSON), tombstones included
    runs    one row per run made here: agent, owner key, trigger (schedule | webhook |
            agent), the tick for a scheduled run (unique per agent: a node never runs a
            tick twice), parent run, input, status, output, error, node, model, tokens,
            timings
    steps   one row per step of a run (a model call or a tool call), committed as it ends

A run still `running` when the node starts was cut by a crash or kill -9: it becomes
`interrupted`. Statements are short and run on the event loop under one lock, as
node/batches.py does.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from node.agents.spec import AgentRecord

__all__ = ["AgentStore", "TERMINAL"]

TERMINAL = ("completed", "incomplete", "failed", "interrupted")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, agent TEXT NOT NULL, owner_key TEXT, trigger TEXT NOT NULL,
    tick INTEGER, parent TEXT, input TEXT NOT NULL, status TEXT NOT NULL, output TEXT,
    error TEXT, node TEXT NOT NULL, node_id TEXT, model TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, started_at REAL, ended_at REAL);
CREATE UNIQUE INDEX IF NOT EXISTS runs_tick ON runs (agent, tick) WHERE tick IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_agent ON runs (agent, created_at);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, n INTEGER NOT NULL, type TEXT NOT NULL, started_at REAL NOT NULL,
    ended_at REAL NOT NULL, data TEXT NOT NULL, PRIMARY KEY (run_id, n));
"""
_RUN_COLS = ("id", "agent", "owner_key", "trigger", "tick", "parent", "input", "status",
             "output", "error", "node", "node_id", "model", "prompt_tokens",
             "completion_tokens", "created_at", "started_at", "ended_at")


class AgentStore:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._q("UPDATE runs SET status = 'interrupted', ended_at = ?, error = 'the node "
                "stopped while this run was in progress' WHERE status = 'running'",
                (time.time(),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------ definitions
    def records(self) -> list[AgentRecord]:
        return [AgentRecord.model_validate_json(r) for (r,) in self._q("SELECT record FROM agents")]

    def save(self, rec: AgentRecord) -> None:
        self._q("INSERT INTO agents (name, record) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                "SET record = excluded.record", (rec.name, rec.model_dump_json()))

    # ------------------------------------------------------------------- runs
    def start(self, **row: Any) -> bool:
        """Insert a run (status running); False when this node already has that tick."""
        cols = ", ".join(row)
        try:
            self._q(f"INSERT INTO runs ({cols}, status, started_at) VALUES "
                    f"({', '.join('?' * len(row))}, 'running', ?)", (*row.values(), time.time()))
        except sqlite3.IntegrityError:
            return False
        return True

    def step(self, run_id: str, n: int, kind: str, started: float, ended: float,
             data: dict[str, Any]) -> None:
        self._q("INSERT INTO steps (run_id, n, type, started_at, ended_at, data) VALUES "
                "(?, ?, ?, ?, ?, ?)", (run_id, n, kind, started, ended, json.dumps(data)))

    def usage(self, run_id: str, prompt: int, completion: int) -> None:
        self._q("UPDATE runs SET prompt_tokens = prompt_tokens + ?, completion_tokens = "
                "completion_tokens + ? WHERE id = ?", (prompt, completion, run_id))

    def finish(self, run_id: str, status: str, output: str | None, error: str | None) -> None:
        self._q("UPDATE runs SET status = ?, output = ?, error = ?, ended_at = ? WHERE id = ? "
                "AND status = 'running'", (status, output, error, time.time(), run_id))

    def run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._q(f"SELECT {', '.join(_RUN_COLS)} FROM runs WHERE id = ?", (run_id,))
        return dict(zip(_RUN_COLS, rows[0])) if rows else None

    def runs(self, agent: str, limit: int) -> list[dict[str, Any]]:
        rows = self._q(f"SELECT {', '.join(_RUN_COLS)} FROM runs WHERE agent = ? ORDER BY "
                       "created_at DESC, id DESC LIMIT ?", (agent, limit))
        return [dict(zip(_RUN_COLS, r)) for r in rows]

    def steps(self, run_id: str, after: int = 0) -> list[dict[str, Any]]:
        return [{"n": n, "type": kind, "started_at": s, "ended_at": e, **json.loads(d)}
                for n, kind, s, e, d in self._q(
                    "SELECT n, type, started_at, ended_at, data FROM steps WHERE run_id = ? "
                    "AND n > ? ORDER BY n", (run_id, after))]

    def recent_ticks(self, per_agent: int) -> dict[str, list[list]]:
        """Per agent, its latest scheduled ticks run here: [[tick ms, running | done]]."""
        out: dict[str, list[list]] = {}
        for agent, tick, status in self._q(
                "SELECT agent, tick, status FROM (SELECT agent, tick, status, ROW_NUMBER() "
                "OVER (PARTITION BY agent ORDER BY tick DESC) AS k FROM runs WHERE tick IS "
                "NOT NULL AND status != 'interrupted') WHERE k <= ?", (per_agent,)):
            out.setdefault(agent, []).append([tick, "running" if status == "running" else "done"])
        return out
