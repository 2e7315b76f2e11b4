"""`/mesh/files/1`: a model file fetched from a mesh peer that already has it.

The gallery's "peers" source (gallery/installer.py, `PeerFetcher`): a pinned file (known
sha256) is asked of the mesh before its origin, so the second node of a LAN to want a model
gets it at LAN speed, without the internet.

Wire (one stream per transfer; frames are mesh/wire/framing.py's length-prefixed msgpack):

    client -> server   {"v": 1, "sha256": <64 hex>, "offset": <int >= 0>}
    server -> client   {"ok": true, "size": <whole file>}, then the raw bytes
                       [offset, size), then the server closes the stream
                       | {"ok": false, "error": "not_found" | "busy" | "bad_offset"}

Design notes
- Who has what. Each node gossips the sha256 of its installed files in
  `NodeState.extra["files"]` (gallery/store.py `advertisement`; cached on the model.yaml mtimes, so a gossip
  tick costs a directory scan; a node with more than MAX_ADVERTISED files sends no list).
  The fetcher asks alive peers that list the hash first, then peers that send no list
  (older nodes, big stores), lowest RTT first; a peer whose list lacks the hash is not
  asked: its list is at most a gossip tick old. At start-up a node has no peer states yet,
  so the daemon's start-up install waits up to PEER_SETTLE_S for a first one (once).
- What is served: only a file `Store.find_file_by_sha256` finds, i.e. one listed in the
  model.yaml of an installed model, with its recorded size, under the models directory
  (checked again here, lexically: a symlinked model directory is the user's choice), and a
  regular file. A peer names a hash, never a path. At most MAX_UPLOADS transfers at once;
  more are answered "busy" and the client moves on.
- Trust: the installer hashes every peer copy before it keeps it (a wrong or truncated copy
  costs one transfer, then the next source is tried). The server does not re-hash what it
  sends (seconds for a 4 GB file); a copy rotted on its disk is caught by the client.
- Resume: a transfer that breaks after some bytes resumes at the bytes already written,
  once more from the same peer (RESUME_TRIES), then from the next peer. Every peer holds
  the same content (same sha256), so the pieces fit.
- Never hang: opening (dial, admission, request, reply) is bounded by OPEN_TIMEOUT; a
  transfer that delivers nothing for STALL_TIMEOUT is abandoned (and resumed elsewhere).
  On the server, a reader that stops reading fails the writer after 5 s (yamux).
- Throughput: 1 MiB writes, and reads of whatever yamux holds (up to 1 MiB); disk reads
  and writes run in worker threads. `python -m bench.gallery` compares a peer fetch with
  a plain HTTP download of the same 98 MB file on loopback: ~50-70 MB/s against ~200-350
  MB/s on a busy 2-core machine, a ratio of ~0.25, short of the 0.5 aimed at. The cost is
  CPU per 64 KiB yamux frame in py-libp2p (yamux, Noise, locks and task switches: ~6-8 ms
  of CPU per MB on each side, against ~1 ms for HTTP); the read-ahead and window-update
  settings in mesh/p2p/host.py ("Bulk throughput") took it from ~43 to ~62 MB/s. Sending
  yamux payloads sized to fit one Noise message (65,507 bytes) showed no clear gain.
  On a 1 GbE LAN the link caps HTTP at ~117 MB/s, about twice this path's rate here.
Left out on purpose: fetching ranges of one file from several peers at once (CPU-bound
per process, not link-bound), a side channel that moves the bytes outside libp2p (a second
listening port and its own encryption: a design change for the mesh, not for this
module), copying a file this node already holds under another model, and advertising
files that are still downloading.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import trio

from mesh.errors import MeshError, PeerError
from mesh.wire.framing import FrameError, pack, read_frame

__all__ = ["PROTOCOL", "MeshFileFetcher", "make_handler", "candidates"]

log = logging.getLogger("mesh.files")

PROTOCOL = "/mesh/files/1"
CHUNK = 1 << 20              # bytes per stream write and disk write
OPEN_TIMEOUT = 10.0          # s: dial + admission + request + reply (proxy.py uses the same)
STALL_TIMEOUT = 15.0         # s without a byte before a transfer is abandoned
REQUEST_TIMEOUT = 10.0       # s the server waits for the request frame
RESUME_TRIES = 2             # attempts per peer while each one makes progress
MAX_UPLOADS = 4              # concurrent transfers a node serves; more are told "busy"
PEER_SETTLE_S = 5.0          # s a freshly started node waits for its first peer's state
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Refused(Exception):
    """The peer answered, but will not (or cannot) give us this file."""


class _Broken(Exception):
    """A transfer that ended early; `done` is the file length reached."""

    def __init__(self, message: str, done: int) -> None:
        super().__init__(message)
        self.done = done


# --------------------------------------------------------------------------- advertising
def candidates(view, sha256: str) -> list:
    """Alive peers to ask for `sha256`: those listing it, then those sending no list;
    each group by RTT (unknown last)."""
    listing, unlisted = [], []
    for p in view.routable():
        files = p.state.extra.get("files")
        if isinstance(files, list):
            if sha256 in files:
                listing.append(p)
        else:
            unlisted.append(p)

    def by_rtt(p) -> tuple[bool, float]:
        return (p.rtt_ms is None, p.rtt_ms or 0.0)
    return sorted(listing, key=by_rtt) + sorted(unlisted, key=by_rtt)


# --------------------------------------------------------------------------- serving
FindFile = Callable[[str], "Path | None"]


def _open_for_peer(find: FindFile, root: Path, sha256: str,
                   offset: int) -> tuple[BinaryIO, int] | str:
    """(open file positioned at offset, its size), or the error to answer (blocking)."""
    path = find(sha256)
    if path is None:
        return "not_found"
    root = os.path.abspath(root)
    p = os.path.abspath(path)
    if os.path.commonpath([root, p]) != root:
        log.warning("not serving %s: outside the models directory %s", p, root)
        return "not_found"
    try:
        fh = open(p, "rb")
    except OSError:
        return "not_found"
    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode):
        fh.close()
        return "not_found"
    if offset > st.st_size:
        fh.close()
        return "bad_offset"
    fh.seek(offset)
    return fh, st.st_size


def _valid_request(req: Any) -> tuple[str, int] | None:
    if not isinstance(req, dict) or req.get("v") != 1:
        return None
    sha, offset = req.get("sha256"), req.get("offset", 0)
    if not isinstance(sha, str) or not _SHA256.match(sha):
        return None
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        return None
    return sha, offset


def make_handler(find: FindFile, root: Path, *, max_uploads: int = MAX_UPLOADS):
    """The `/mesh/files/1` handler: send the file `find(sha256)` names (under `root`: the
    gallery's `Store.find_file_by_sha256` and models directory) to a peer that asks."""
    slots = trio.Semaphore(max_uploads)

    async def handle(stream, peer_id: str) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                req = await read_frame(stream)
        except (FrameError, PeerError, trio.TooSlowError, ValueError) as exc:
            log.info("bad file request from %s: %s", peer_id[-8:], exc or type(exc).__name__)
            await stream.reset()
            return
        parsed = _valid_request(req)
        if parsed is None:
            log.info("bad file request from %s: %r", peer_id[-8:], req)
            await stream.reset()
            return
        sha, offset = parsed
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await stream.write(pack({"ok": False, "error": "busy"}))
            return
        try:
            opened = await trio.to_thread.run_sync(_open_for_peer, find, root, sha, offset)
            if isinstance(opened, str):
                await stream.write(pack({"ok": False, "error": opened}))
                return
            fh, size = opened
            try:
                await _send_file(stream, fh, size, offset, peer_id)
            finally:
                fh.close()
        finally:
            slots.release()

    return handle


async def _send_file(stream, fh: BinaryIO, size: int, offset: int, peer_id: str) -> None:
    t0 = time.monotonic()
    await stream.write(pack({"ok": True, "size": size}))
    sent = offset
    while sent < size:
        data = await trio.to_thread.run_sync(fh.read, min(CHUNK, size - sent))
        if not data:            # the file shrank under us: the client sees a short body
            break
        await stream.write(data)
        sent += len(data)
    took = max(time.monotonic() - t0, 1e-6)
    log.info("sent %d bytes of %s to peer %s in %.1f s (%.0f MB/s)", sent - offset,
             Path(fh.name).name, peer_id[-8:], took, (sent - offset) / took / 1e6)


# --------------------------------------------------------------------------- fetching
class MeshFileFetcher:
    """`gallery.PeerFetcher` over the mesh: asks alive peers for a file by its sha256.

    After a successful `fetch`, `source` says where the bytes came from ("peer:<name>";
    the installer logs it and reports it in the install job).
    """

    def __init__(self, p2p, *, settle_s: float = 0.0, open_timeout: float = OPEN_TIMEOUT,
                 stall_timeout: float = STALL_TIMEOUT) -> None:
        self.p2p = p2p
        self.settle_s = settle_s          # wait this long for a first peer (node start-up)
        self.open_timeout = open_timeout
        self.stall_timeout = stall_timeout
        self.source: str | None = None

    def __repr__(self) -> str:
        return "mesh peers"

    async def fetch(self, sha256: str, size: int | None, dest_path: Path,
                    progress_cb: Callable[[int], None]) -> bool:
        """Write the file to dest_path from a peer; False if no peer could (never raises)."""
        self.source = None
        try:
            return await self._fetch(sha256.lower(), size, Path(dest_path), progress_cb)
        except OSError as exc:            # our own disk: the origin will say it better
            log.info("peer fetch of %s: cannot write %s: %s", sha256[:12], dest_path, exc)
        except Exception as exc:          # a bug here must not fail the install
            log.warning("peer fetch of %s failed: %r", sha256[:12], exc, exc_info=True)
        return False

    async def _fetch(self, sha256: str, size: int | None, dest: Path,
                     progress_cb: Callable[[int], None]) -> bool:
        view = self.p2p.view
        if self.settle_s > 0 and not view.routable():
            await view.wait_for(lambda v: bool(v.routable()), self.settle_s)
            self.settle_s = 0.0
        peers = candidates(view, sha256)
        if not peers:
            return False
        fh = await trio.to_thread.run_sync(open, dest, "wb")
        try:
            done = 0
            for peer in peers:
                for _ in range(RESUME_TRIES):
                    before = done
                    try:
                        done = await self._transfer(peer, sha256, size, fh, done, progress_cb)
                    except _Refused as exc:
                        log.debug("peer %s: %s", peer.name, exc)
                        break
                    except _Broken as exc:
                        done = exc.done
                        log.info("peer %s: %s%s", peer.name, exc,
                                 f"; resuming at byte {done}" if done > before else "")
                        if done == before:
                            break
                        continue
                    await trio.to_thread.run_sync(fh.close)
                    self.source = f"peer:{peer.name}"
                    return True
            return False
        finally:
            fh.close()

    async def _transfer(self, peer, sha256: str, size: int | None, fh: BinaryIO, offset: int,
                        progress_cb: Callable[[int], None]) -> int:
        """Receive [offset, end) from one peer into fh; the new length. _Refused if the
        peer will not serve it; _Broken (with the length reached) if the transfer broke."""
        stream = None
        done = offset
        finished = False
        try:
            try:
                with trio.fail_after(self.open_timeout):
                    stream = await self.p2p.open_stream(peer.peer_id, PROTOCOL)
                    await stream.write(pack({"v": 1, "sha256": sha256, "offset": offset}))
                    await stream.close()          # half-close: the request is all we send
                    reply = await read_frame(stream)
            except trio.TooSlowError:
                raise _Broken(f"no answer within {self.open_timeout:.0f} s", done) from None
            except (MeshError, FrameError, ValueError) as exc:
                raise _Broken(str(exc) or type(exc).__name__, done) from None
            if not isinstance(reply, dict) or reply.get("ok") is not True:
                err = reply.get("error") if isinstance(reply, dict) else None
                raise _Refused(f"refused: {err or reply!r}")
            total = reply.get("size")
            if (not isinstance(total, int) or isinstance(total, bool) or total < offset
                    or (size is not None and total != size)):
                raise _Refused(f"it has {total!r} bytes, we want {size}")

            def seek() -> None:
                fh.seek(offset)
                fh.truncate()
            await trio.to_thread.run_sync(seek)
            buf = bytearray()
            while done < total:
                chunk, reason = b"", f"nothing for {self.stall_timeout:.0f} s"
                with trio.move_on_after(self.stall_timeout):
                    try:
                        chunk = await stream.read(CHUNK)
                        reason = "the peer closed the stream"
                    except MeshError as exc:
                        reason = str(exc)
                if not chunk:
                    done += await self._flush(fh, buf)
                    raise _Broken(f"{reason} at byte {done} of {total}", done)
                if done + len(buf) + len(chunk) > total:
                    raise _Refused("it sent more bytes than the file has")
                buf += chunk
                if len(buf) >= CHUNK or done + len(buf) == total:
                    done += await self._flush(fh, buf)
                    progress_cb(done)
            finished = True
            return done
        finally:
            if stream is not None and not finished:
                await stream.reset()

    @staticmethod
    async def _flush(fh: BinaryIO, buf: bytearray) -> int:
        n = len(buf)
        if n:
            data = bytes(buf)
            buf.clear()
            await trio.to_thread.run_sync(fh.write, data)
        return n
