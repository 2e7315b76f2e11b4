"""`/mesh/records/1`: a stored record read or deleted on the node that holds it.

Some API objects live where they were made: a stored response (api/responses_routes.py,
node/responses.py) now, an uploaded file later. Their ids say which node that is, so any
node of the mesh can answer for them by asking the holder: ``make_id("resp_", node_id)``
is ``resp_<peer id>_<24 hex>``; ``owner_of`` reads the peer id back (None for an id made
by a node outside any mesh, or not made by us: "look here").

Wire (one stream per question; mesh/wire/framing.py frames):

    asker  -> holder   {"v": 1, "op": "get" | "delete", "kind": "response", "id": str,
                        "caller": {name, key_id, features} | None}
    holder -> asker    {"ok": true, "record": map}                      get
                       {"ok": true}                                     delete
                       {"ok": false, "error": class name of mesh/errors.py, "message": str}

Who may read is the holder's decision, made by the record source of that kind from the
caller the asking node authenticated (the key itself never travels, as in mesh/proxy.py):
a source answers None (get) or False (delete) for a record the caller may not see, and
that is indistinguishable from a missing one (NotFound). Admission (mesh/p2p) already
limits askers to nodes holding the mesh token.

A source is any object with ``async get(id, caller) -> dict | None`` and
``async delete(id, caller) -> bool``; the composition root registers one per kind.
Bounded waits: the holder waits REQUEST_TIMEOUT for the question; the asker allows
OPEN_TIMEOUT for dial, question and answer (a holder that is gone is a PeerError, 502).
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any, Protocol

import trio

from mesh.errors import BadRequest, MeshError, NotFound, PeerError, by_name, name_of
from mesh.wire.framing import FrameError, pack, read_frame

__all__ = ["PROTOCOL", "RecordSource", "RecordClient", "make_handler", "make_id", "owner_of"]

log = logging.getLogger("mesh.records")

PROTOCOL = "/mesh/records/1"
VERSION = 1
OPEN_TIMEOUT = 10.0          # s: dial + admission + question + answer (as mesh/files.py)
REQUEST_TIMEOUT = 10.0       # s the holder waits for the question
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{30,80}$")    # base58
_OPS = ("get", "delete")


class RecordSource(Protocol):
    async def get(self, record_id: str, caller: dict[str, Any] | None) -> dict[str, Any] | None: ...
    async def delete(self, record_id: str, caller: dict[str, Any] | None) -> bool: ...


def make_id(prefix: str, node_id: str | None) -> str:
    """A new record id naming its holder (`node_id`: a peer id, None outside a mesh)."""
    tail = secrets.token_hex(12)
    return f"{prefix}{node_id}_{tail}" if node_id else f"{prefix}{tail}"


def owner_of(prefix: str, record_id: str) -> str | None:
    """The peer id inside an id of `make_id(prefix, ...)`; None when it names none."""
    if not record_id.startswith(prefix):
        return None
    owner, sep, _ = record_id[len(prefix):].rpartition("_")
    return owner if sep and _PEER_ID.match(owner) else None


# --------------------------------------------------------------------------- holder
def make_handler(sources: dict[str, RecordSource]):
    """The `/mesh/records/1` handler: answer a peer's question from `sources[kind]`."""

    async def handle(stream, peer_id: str) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                req = await read_frame(stream)
        except (FrameError, PeerError, trio.TooSlowError) as exc:
            log.info("bad records request from %s: %s", peer_id[-8:], exc or type(exc).__name__)
            await stream.reset()
            return
        try:
            op, kind, rid, caller = _valid(req)
            source = sources.get(kind)
            if source is None:
                raise NotFound(f"this node keeps no records of kind {kind!r}")
            if op == "get":
                record = await source.get(rid, caller)
                if record is None:
                    raise NotFound(f"no {kind} with id {rid!r}")
                reply: dict[str, Any] = {"ok": True, "record": record}
            else:
                if not await source.delete(rid, caller):
                    raise NotFound(f"no {kind} with id {rid!r}")
                reply = {"ok": True}
        except MeshError as exc:
            reply = {"ok": False, "error": name_of(exc), "message": exc.message}
        await stream.write(pack(reply))

    return handle


def _valid(req: Any) -> tuple[str, str, str, dict[str, Any] | None]:
    if not isinstance(req, dict) or req.get("v") != VERSION:
        raise BadRequest(f"records request of version {(req or {}).get('v')!r} refused")
    op, kind, rid, caller = req.get("op"), req.get("kind"), req.get("id"), req.get("caller")
    if op not in _OPS or not isinstance(kind, str) or not isinstance(rid, str):
        raise BadRequest("a records request needs op (get | delete), kind and id")
    if caller is not None and not isinstance(caller, dict):
        raise BadRequest("caller must be a map or null")
    return op, kind, rid, caller


# --------------------------------------------------------------------------- asker
class RecordClient:
    """Asks the holder of a record, over the mesh."""

    def __init__(self, p2p, *, open_timeout: float = OPEN_TIMEOUT) -> None:
        self.p2p = p2p
        self.open_timeout = open_timeout

    async def get(self, peer_id: str, kind: str, record_id: str,
                  caller: dict[str, Any] | None) -> dict[str, Any]:
        """The record; NotFound when the holder has none the caller may see."""
        reply = await self._ask(peer_id, "get", kind, record_id, caller)
        record = reply.get("record")
        if not isinstance(record, dict):
            raise PeerError(f"peer {peer_id[-8:]} answered a {kind} without its record")
        return record

    async def delete(self, peer_id: str, kind: str, record_id: str,
                     caller: dict[str, Any] | None) -> None:
        await self._ask(peer_id, "delete", kind, record_id, caller)

    async def _ask(self, peer_id: str, op: str, kind: str, record_id: str,
                   caller: dict[str, Any] | None) -> dict[str, Any]:
        question = {"v": VERSION, "op": op, "kind": kind, "id": record_id, "caller": caller}
        stream = None
        answered = False
        try:
            with trio.fail_after(self.open_timeout):
                stream = await self.p2p.open_stream(peer_id, PROTOCOL)
                await stream.write(pack(question))
                await stream.close()             # half-close: the question is all we send
                reply = await read_frame(stream)
                answered = True
        except trio.TooSlowError:
            raise PeerError(f"the node holding {record_id!r} did not answer within "
                            f"{self.open_timeout:.0f} s") from None
        except FrameError as exc:
            raise PeerError(f"the node holding {record_id!r} sent a bad frame: {exc}") from exc
        except PeerError as exc:
            raise PeerError(f"the node holding {record_id!r} cannot be reached: "
                            f"{exc.message}") from exc
        finally:
            if stream is not None and not answered:
                await stream.reset()
        if not isinstance(reply, dict):
            raise PeerError(f"the node holding {record_id!r} closed the stream without an answer")
        if reply.get("ok") is not True:
            raise by_name(str(reply.get("error")))(str(reply.get("message") or "refused"))
        return reply
