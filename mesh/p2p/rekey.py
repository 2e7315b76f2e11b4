"""Token rotation over the mesh (``mesh token rotate``): protocol ``/mesh/rekey/1``.

One request per stream, on an admitted (Noise-encrypted) stream only::

    A -> B   msgpack {"token": "mesh1-...", "retire_at": <unix time>, "since": <unix time>}
             then A half-closes
    B -> A   msgpack {"ok": true} | {"ok": false, "error": "<why>"}

The steps (the keys' rules during the grace period are in mesh/token.py, "Rotation"):

1. The node asked to rotate makes a new token (the old one's bootstrap addresses kept),
   applies it (``MeshSecrets.rotate``; stored 0600 under its home) and pushes it to every
   admitted peer at once, each push bounded by ``PUSH_TIMEOUT``; it answers with who
   acknowledged and who did not.
2. A node that receives a rotation applies and stores it, and acknowledges. The same
   token again is acknowledged (pushes cross); a different one while a rotation is in its
   grace period is refused (two rotations at once: the operator reruns one).
3. During the grace period every rotated node pushes the token to each connected peer
   whose gossip shows no proof of it (below), e.g. one admitted later (a node that was away comes back with the old token, is admitted by it and gets
   the new one), if this node first saw that peer before the rotation began (``since``,
   the initiator's clock, carried in every push): a machine new to the mesh that got in
   with the old token during the grace period is not handed the new one. Revoked peers
   (mesh/nodes.py) are never admitted, so never get it.
4. Rotated nodes gossip a proof that they hold the new token (``NodeState.rekey``).
5. At ``retire_at`` every node drops the retiring token (new connections then need the
   new one) and closes its connections to the peers whose latest gossip carries no valid
   proof: a machine that kept only the old token is out, and cannot come back. Peers with
   the proof keep their connections, so streams running across the deadline go on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack
import trio

from mesh.errors import BadRequest, MeshError, PeerError
from mesh.token import MAX_GRACE, Token, parse_token

__all__ = ["REKEY_PROTOCOL", "PUSH_TIMEOUT", "MIN_GRACE", "check_rotation", "push", "handle"]

log = logging.getLogger(__name__)

REKEY_PROTOCOL = "/mesh/rekey/1"
PUSH_TIMEOUT = 5.0           # s for one push: open, send, acknowledgement
REPUSH_INTERVAL = 3.0        # s between two pushes to one peer that still shows no proof
MIN_GRACE = 2.0              # s; below this a peer could not even hear of it before the end
MAX_FRAME = 16 * 1024        # bytes; a token with a handful of bootstrap addresses is ~300


def check_rotation(token: Any, retire_at: Any, now: float | None = None) -> Token:
    """The new token of a rotation request, or BadRequest naming what is wrong."""
    now = time.time() if now is None else now
    if not isinstance(token, str):
        raise BadRequest("a rotation carries the new token as a string", param="token")
    new = parse_token(token)
    if isinstance(retire_at, bool) or not isinstance(retire_at, int | float):
        raise BadRequest("retire_at must be a unix time", param="retire_at")
    if not now < retire_at <= now + MAX_GRACE:
        raise BadRequest(f"retire_at must be in the next {MAX_GRACE // 86400} days", param="retire_at")
    return new


async def _read_frame(stream: Any) -> Any:
    buf = bytearray()
    while True:
        chunk = await stream.read(MAX_FRAME + 1 - len(buf))
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_FRAME:
            raise PeerError(f"a rekey message over {MAX_FRAME} bytes")
    try:
        return msgpack.unpackb(bytes(buf), raw=False)
    except Exception as exc:
        raise PeerError(f"a rekey message that is not msgpack: {exc}") from exc


async def push(p2p: Any, peer: str, token: Token, retire_at: float, since: float) -> str:
    """Hand the rotation to one peer: "" when it acknowledged, else why not."""
    try:
        with trio.fail_after(PUSH_TIMEOUT):
            stream = await p2p.open_stream(peer, REKEY_PROTOCOL)
            async with stream:
                await stream.write(msgpack.packb({"token": token.encode(), "retire_at": retire_at,
                                                         "since": since}))
                await stream.close()
                answer = await _read_frame(stream)
    except trio.TooSlowError:
        return f"no answer within {PUSH_TIMEOUT:.0f} s"
    except MeshError as exc:
        return exc.message
    if isinstance(answer, dict) and answer.get("ok") is True:
        return ""
    return str(answer.get("error") if isinstance(answer, dict) else answer)[:200] or "refused"


async def handle(p2p: Any, stream: Any, peer: str) -> None:
    """The ``/mesh/rekey/1`` handler: apply a rotation pushed by an admitted peer."""
    with trio.fail_after(PUSH_TIMEOUT):
        msg = await _read_frame(stream)
    try:
        if not isinstance(msg, dict):
            raise BadRequest("a rekey message is a map")
        new = check_rotation(msg.get("token"), msg.get("retire_at"))
        since = msg.get("since")
        if isinstance(since, bool) or not isinstance(since, int | float) or since > msg["retire_at"]:
            raise BadRequest("since must be a unix time before retire_at", param="since")
        p2p.apply_rotation(new, float(msg["retire_at"]), since=float(since), source=peer)
        answer: dict[str, Any] = {"ok": True}
    except MeshError as exc:
        log.warning("refused a token rotation from %s: %s", peer[-8:], exc.message)
        answer = {"ok": False, "error": exc.message}
    await stream.write(msgpack.packb(answer))
