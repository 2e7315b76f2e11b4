"""`/mesh/files/1`: a model file fetched from the mesh peers that already have it.

The gallery's "peers" source (gallery/installer.py, `PeerFetcher`): a pinned file (known
sha256) is asked of the mesh before its origin, so the second node of a LAN to want a model
gets it at LAN speed, from every peer that has it, without the internet.

Wire (frames are mesh/wire/framing.py's length-prefixed msgpack):

    v2, bytes on the bulk side channel (mesh/bulk.py), one libp2p stream per session:
      client -> server  {"v": 2, "sha256": <64 hex>, "bulk": <client hello>}
      server -> client  {"ok": true, "size": <whole file>, "bulk": <offer> | null}
                        | {"ok": false, "error": "not_found" | "busy" | "bad_offset"}
      then, on the side channel, any number of
      client -> server  range request: offset, length (8 + 8 bytes, big-endian)
      server -> client  exactly `length` bytes of the file, in records
      and the client closes it.
    v1, bytes on the libp2p stream itself (a peer that offers no side channel, or one we
    cannot reach on it):
      client -> server  {"v": 1, "sha256": <64 hex>, "offset": <int >= 0>}
      server -> client  {"ok": true, "size": <whole file>}, then the raw bytes
                        [offset, size), then the server closes the stream | {"ok": false, ...}

Design notes
- Who has what. Each node gossips the sha256 of its installed files in
  `NodeState.extra["files"]` (gallery/store.py `advertisement`; cached on the model.yaml
  mtimes, so a gossip tick costs a directory scan; a node with more than MAX_ADVERTISED
  files sends no list). The fetcher asks alive peers that list the hash first, then peers
  that send no list (older nodes, big stores), lowest RTT first; a peer whose list lacks
  the hash is not asked. At start-up a node has no peer states yet, so the daemon's
  start-up install waits up to PEER_SETTLE_S for a first one (once).
- Pieces. The file is cut into PIECE-byte pieces, handed out in order to one worker per
  source peer (at most MAX_SOURCES at once), so a faster peer takes more of them. A peer
  that breaks mid-piece gives the rest of it back (the bytes it wrote count), gets
  RESUME_TRIES sessions while it makes progress, and the next candidate takes its place.
  Every copy holds the same content (same sha256), so the pieces fit.
- Trust. The fetcher hashes the file as its prefix completes (a thread that follows the
  lowest unfinished piece, reading back from the page cache) and says True only when the
  sha256 and size are right; the installer takes that verdict (`verified`). A wrong copy:
  if one peer sent all of it, that peer is dropped for this file and the others are asked;
  if several did, each is asked for the whole file alone, and each whose copy fails is
  dropped. A lie costs transfers, never a wrong file.
- What is served: only a file `Store.find_file_by_sha256` finds, i.e. one listed in the
  model.yaml of an installed model, with its recorded size, under the models directory
  (checked again here, lexically), and a regular file. A peer names a hash, never a path;
  a range outside the file ends the session. At most MAX_UPLOADS sessions at once; more
  are answered "busy" and the client moves on.
- Throughput. Side-channel sessions move their bytes in worker threads on blocking
  sockets: the server reads 1 MiB with `readinto` into a reused buffer (no mmap: a file
  truncated under a mapping would kill the node with SIGBUS) and seals it in place
  (AES-GCM, ~0.5 ms/MiB here); the client receives into a reused buffer, opens it in
  place and `pwrite`s it at its offset. `python -m bench.gallery` measures it against
  plain HTTP.
- Never hang: opening a session (dial, admission, request, reply, side-channel
  connection) is bounded by OPEN_TIMEOUT; a session that delivers nothing for
  STALL_TIMEOUT is abandoned (and its piece given to another). Cancellation shuts the
  side-channel socket down, so a blocked thread ends at once.
Left out on purpose: copying a file this node already holds under another model, and
advertising files that are still downloading.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import trio

from mesh import bulk
from mesh.errors import MeshError, PeerError
from mesh.wire.framing import FrameError, pack, read_frame

__all__ = ["PROTOCOL", "MeshFileFetcher", "make_handler", "candidates"]

log = logging.getLogger("mesh.files")

PROTOCOL = "/mesh/files/1"
PURPOSE = "files"            # the side channel's key-derivation label
CHUNK = 1 << 20              # bytes per stream write and disk write (v1)
PIECE = 16 << 20             # bytes per piece handed to one source
MAX_SOURCES = 4              # peers a file is fetched from at once
OPEN_TIMEOUT = 10.0          # s: dial + admission + request + reply (proxy.py uses the same)
STALL_TIMEOUT = 15.0         # s without a byte before a transfer is abandoned
REQUEST_TIMEOUT = 10.0       # s the server waits for the request frame
RESUME_TRIES = 2             # sessions per peer and round while each one makes progress
MAX_UPLOADS = 4              # concurrent sessions a node serves; more are told "busy"
PEER_SETTLE_S = 5.0          # s a freshly started node waits for its first peer's state
PROGRESS_EVERY = 0.1         # s between progress reports
HASH_CHUNK = 4 << 20         # bytes the verifying thread hashes per read
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RANGE = struct.Struct(">QQ")


class _Refused(Exception):
    """The peer answered, but will not (or cannot) give us this file."""


class _Broken(Exception):
    """A transfer that ended early; `got` is the bytes of the piece written."""

    def __init__(self, message: str, got: int = 0) -> None:
        super().__init__(message)
        self.got = got


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


def _valid_request(req: Any) -> tuple[int, str, int] | None:
    """(version, sha256, offset) of a well-formed request."""
    if not isinstance(req, dict) or req.get("v") not in (1, 2):
        return None
    sha, offset = req.get("sha256"), req.get("offset", 0)
    if not isinstance(sha, str) or not _SHA256.match(sha):
        return None
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        return None
    return req["v"], sha, offset


def make_handler(find: FindFile, root: Path, *, bulk_server: bulk.BulkServer | None = None,
                 max_uploads: int = MAX_UPLOADS):
    """The `/mesh/files/1` handler: send the file `find(sha256)` names (under `root`: the
    gallery's `Store.find_file_by_sha256` and models directory) to a peer that asks, over
    the side channel of `bulk_server` when the peer asks for one and it listens."""
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
        version, sha, offset = parsed
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
                if version == 1:
                    await _send_file(stream, fh, size, offset, peer_id)
                else:
                    offer = (bulk_server.offer(peer_id, PURPOSE, req.get("bulk"))
                             if bulk_server is not None else None)
                    await stream.write(pack({"ok": True, "size": size,
                                             "bulk": offer.wire if offer else None}))
                    if offer is not None:
                        await _serve_session(offer, bulk_server, fh, size, peer_id)
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
    _log_sent(sent - offset, fh, peer_id, t0, "stream")


async def _serve_session(offer: bulk.Offer, server: bulk.BulkServer, fh: BinaryIO, size: int,
                         peer_id: str) -> None:
    sock = await offer.accept(server)
    if sock is None:
        log.info("peer %s never opened the side channel it asked for", peer_id[-8:])
        return
    chan = bulk.SyncChannel(sock, offer.keys, timeout=STALL_TIMEOUT)
    t0 = time.monotonic()
    sent = 0
    try:
        sent = await bulk.run_blocking(_serve_ranges, chan, fh, size, abort=bulk.shutdown(sock))
    except (bulk.ChannelBroken, OSError) as exc:
        log.info("side channel to %s: %s", peer_id[-8:], exc)
    finally:
        chan.close()
    _log_sent(sent, fh, peer_id, t0, "side channel")


def _serve_ranges(chan: bulk.SyncChannel, fh: BinaryIO, size: int) -> int:
    """Answer range requests until the client closes (blocking); bytes sent."""
    buf = bytearray(bulk.RECORD)
    view = memoryview(buf)
    sent = 0
    while True:
        req = chan.recv()
        if not req:
            return sent
        if len(req) != _RANGE.size:
            raise bulk.ChannelBroken("malformed range request")
        offset, length = _RANGE.unpack(req)
        if offset + length > size:
            raise bulk.ChannelBroken(f"range {offset}+{length} beyond the file's {size} bytes")
        fh.seek(offset)
        left = length
        while left:
            n = fh.readinto(view[:min(left, bulk.RECORD)])
            if not n:
                raise bulk.ChannelBroken("the file shrank under us")
            chan.send(view[:n])
            left -= n
            sent += n


def _log_sent(n: int, fh: BinaryIO, peer_id: str, t0: float, how: str) -> None:
    took = max(time.monotonic() - t0, 1e-6)
    log.info("sent %d bytes of %s to peer %s over the %s in %.1f s (%.0f MB/s)", n,
             Path(fh.name).name, peer_id[-8:], how, took, n / took / 1e6)


# --------------------------------------------------------------------------- fetching
class _Pieces:
    """Pieces to fetch and the finished prefix, shared by worker threads and the hasher."""

    def __init__(self, size: int, piece: int) -> None:
        self.size = size
        self._todo = collections.deque((o, min(piece, size - o)) for o in range(0, size, piece))
        self._ends: dict[int, int] = {}
        self._cond = threading.Condition()
        self.prefix = 0            # bytes [0, prefix) are written
        self.received = 0
        self.stopped = False

    def take(self) -> tuple[int, int] | None:
        with self._cond:
            return self._todo.popleft() if self._todo and not self.stopped else None

    @property
    def left(self) -> bool:
        with self._cond:
            return bool(self._todo)

    def add(self, n: int) -> None:
        with self._cond:
            self.received += n

    def finished(self, offset: int, n: int, *, rest: int = 0) -> None:
        """[offset, offset+n) is written; `rest` more bytes of the piece go back."""
        with self._cond:
            if n:
                self._ends[offset] = offset + n
                while self.prefix in self._ends:
                    self.prefix = self._ends.pop(self.prefix)
                self._cond.notify_all()
            if rest:
                self._todo.appendleft((offset + n, rest))

    def wait_beyond(self, pos: int) -> int:
        """The prefix once it passes `pos` (or whatever it is when stopped)."""
        with self._cond:
            self._cond.wait_for(lambda: self.prefix > pos or self.stopped)
            return self.prefix

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


def _hash_prefix(fd: int, pieces: _Pieces) -> str | None:
    """sha256 of the file, hashed as its prefix is written (blocking); None if stopped."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    pos = 0
    while pos < pieces.size:
        upto = pieces.wait_beyond(pos)
        if pieces.stopped and upto <= pos:
            return None
        while pos < upto:
            n = os.preadv(fd, [view[:min(HASH_CHUNK, upto - pos)]], pos)
            if n <= 0:
                return None
            h.update(view[:n])
            pos += n
    return h.hexdigest()


@dataclass
class _Source:
    peer: Any
    got: int = 0                 # bytes this peer wrote in this round
    error: str = ""
    refused: bool = False        # it will not serve this file (size, not found, lies)
    mode: str = "side channel"


@dataclass
class _Round:
    sources: list[_Source] = field(default_factory=list)
    sha256: str | None = None    # of the whole file, when every piece arrived


class MeshFileFetcher:
    """`gallery.PeerFetcher` over the mesh: asks alive peers for a file by its sha256.

    After a successful `fetch`, `source` says where the bytes came from ("peer:<name>",
    or "peer:<a>+<b>" from several), `sources` how much came from each and how, and
    `verified` holds the (sha256, size) it checked.
    `side_channel=False` keeps every byte on libp2p streams (benchmarks, tests).
    """

    def __init__(self, p2p, *, settle_s: float = 0.0, open_timeout: float = OPEN_TIMEOUT,
                 stall_timeout: float = STALL_TIMEOUT, side_channel: bool = True,
                 max_sources: int = MAX_SOURCES, piece: int = PIECE) -> None:
        self.p2p = p2p
        self.settle_s = settle_s          # wait this long for a first peer (node start-up)
        self.open_timeout = open_timeout
        self.stall_timeout = stall_timeout
        self.side_channel = side_channel
        self.max_sources = max_sources
        self.piece = piece
        self.source: str | None = None
        self.verified: tuple[str, int] | None = None
        self.sources: list[tuple[str, int, str]] = []    # (peer, bytes, how) of the last fetch

    def __repr__(self) -> str:
        return "mesh peers"

    async def fetch(self, sha256: str, size: int | None, dest_path: Path,
                    progress_cb: Callable[[int], None]) -> bool:
        """Write the file to dest_path from peers and verify it; False if no peer could
        (never raises)."""
        self.source = self.verified = None
        self.sources = []
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
        if size is None:
            size = await self._size_of(sha256)
            if size is None:
                return False
        dropped: set[str] = set()
        alone: list = []                  # peers to ask for the whole file, one by one
        fd = await trio.to_thread.run_sync(os.open, dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while True:
                if alone:
                    peers = [alone.pop(0)]
                else:
                    peers = [p for p in candidates(view, sha256) if p.peer_id not in dropped]
                    if not peers:
                        return False
                t0 = time.monotonic()
                r = await self._round(peers, sha256, size, fd, progress_cb)
                for s in r.sources:
                    if s.refused:
                        dropped.add(s.peer.peer_id)
                used = [s for s in r.sources if s.got]
                if r.sha256 is None:
                    if not alone:
                        return False      # every candidate failed or refused
                    continue
                if r.sha256 == sha256:
                    await trio.to_thread.run_sync(os.fsync, fd)
                    names = "+".join(s.peer.name for s in used) or peers[0].name
                    self.source, self.verified = f"peer:{names}", (sha256, size)
                    self.sources = [(s.peer.name, s.got, s.mode) for s in used]
                    took = max(time.monotonic() - t0, 1e-6)
                    log.info("fetched %s (%d bytes) from %s in %.1f s (%.0f MB/s)", sha256[:12],
                             size, ", ".join(f"{s.peer.name} {s.got * 100 // max(1, size)}% "
                                             f"over the {s.mode}" for s in used),
                             took, size / took / 1e6)
                    return True
                if len(used) == 1:
                    log.warning("peer %s sent a copy of %s whose sha256 is %s: dropped for "
                                "this file", used[0].peer.name, sha256[:12], r.sha256)
                    dropped.add(used[0].peer.peer_id)
                else:
                    log.warning("the copy of %s from %s does not verify (sha256 %s): asking "
                                "each alone", sha256[:12], ", ".join(s.peer.name for s in used),
                                r.sha256)
                    alone = [s.peer for s in used]
        finally:
            await trio.to_thread.run_sync(os.close, fd)

    async def _size_of(self, sha256: str) -> int | None:
        for peer in candidates(self.p2p.view, sha256):
            try:
                size, session = await self._open_session(peer, sha256, None)
            except (_Refused, _Broken) as exc:
                log.debug("peer %s: %s", peer.name, exc)
                continue
            await session.aclose()
            return size
        return None

    async def _round(self, peers: list, sha256: str, size: int, fd: int,
                     progress_cb: Callable[[int], None]) -> _Round:
        """Fetch every piece from `peers` (at most max_sources at once, the rest as
        replacements) while hashing; the file's sha256 if every piece arrived."""
        pieces = _Pieces(size, self.piece)
        result = _Round()
        queue = list(peers)
        wake = trio.Event()
        active = 0

        async def source(peer) -> None:
            nonlocal active, wake
            s = _Source(peer)
            result.sources.append(s)
            try:
                await self._work(s, sha256, size, pieces, fd)
            finally:
                active -= 1
                wake.set()

        async def report() -> None:
            last = -1
            while True:
                if pieces.received != last:
                    last = pieces.received
                    progress_cb(min(last, size))
                await trio.sleep(PROGRESS_EVERY)

        digest: list[str | None] = [None]

        async def verify() -> None:
            digest[0] = await bulk.run_blocking(_hash_prefix, fd, pieces, abort=pieces.stop)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            async with trio.open_nursery() as workers:
                if size:
                    workers.start_soon(verify)
                while True:
                    while queue and active < self.max_sources and pieces.left:
                        active += 1
                        workers.start_soon(source, queue.pop(0))
                    if active == 0:
                        break
                    await wake.wait()
                    wake = trio.Event()
                pieces.stop()                       # ends verify if pieces are missing
            nursery.cancel_scope.cancel()
        if pieces.prefix == size:
            result.sha256 = digest[0] if size else hashlib.sha256(b"").hexdigest()
        progress_cb(pieces.received)
        return result

    async def _work(self, s: _Source, sha256: str, size: int, pieces: _Pieces, fd: int) -> None:
        """One source: sessions while they make progress, pieces until none are left."""
        for _ in range(RESUME_TRIES):
            before = s.got
            try:
                _, session = await self._open_session(s.peer, sha256, size)
            except _Refused as exc:
                s.error, s.refused = str(exc), True
                log.info("peer %s: %s", s.peer.name, exc)
                return
            except _Broken as exc:
                s.error = str(exc)
                log.info("peer %s: %s", s.peer.name, exc)
                return
            s.mode = session.mode
            try:
                while (piece := pieces.take()) is not None:
                    offset, n = piece
                    try:
                        await session.get(offset, n, fd, pieces, s)
                    except _Broken as exc:
                        pieces.finished(offset, exc.got, rest=n - exc.got)
                        raise
                    except BaseException:
                        pieces.finished(offset, 0, rest=n)
                        raise
                    pieces.finished(offset, n)
                return
            except _Refused as exc:
                s.error, s.refused = str(exc), True
                log.info("peer %s: %s", s.peer.name, exc)
                return
            except _Broken as exc:
                s.error = str(exc)
                log.info("peer %s: %s%s", s.peer.name, exc,
                         "; resuming" if s.got > before else "")
                if s.got == before:
                    return
            finally:
                await session.aclose()

    async def _open_session(self, peer, sha256: str, size: int | None):
        """(the file's size, a session) from one peer: over a side channel when it offers
        one we can reach, else over libp2p streams. _Refused / _Broken."""
        stream = None
        try:
            with trio.fail_after(self.open_timeout):
                stream = await self.p2p.open_stream(peer.peer_id, PROTOCOL)
                nonce, hello = bulk.client_hello()
                await stream.write(pack({"v": 2, "sha256": sha256, "bulk": hello}
                                        if self.side_channel else
                                        {"v": 2, "sha256": sha256}))
                reply = await read_frame(stream)
                total = self._check(reply, size)
                offer = reply.get("bulk")
                if offer is None or not self.side_channel:
                    await stream.reset()
                    return total, _StreamSession(self, peer, sha256, total)
                try:
                    conn, keys = await bulk.connect(bulk.ips_of(peer.state.addrs), offer, nonce,
                                                    PURPOSE, self.p2p.peer_id, peer.peer_id)
                except bulk.ChannelBroken as exc:
                    log.info("peer %s: %s; using the libp2p stream instead", peer.name, exc)
                    await stream.reset()
                    return total, _StreamSession(self, peer, sha256, total)
            sock = bulk.to_blocking(conn)
            return total, _BulkSession(self, stream, bulk.SyncChannel(sock, keys,
                                                                      timeout=self.stall_timeout))
        except trio.TooSlowError:
            if stream is not None:
                await stream.reset()
            raise _Broken(f"no answer within {self.open_timeout:.0f} s") from None
        except (MeshError, FrameError, ValueError) as exc:
            if stream is not None:
                await stream.reset()
            raise _Broken(getattr(exc, "message", None) or str(exc) or type(exc).__name__) from None
        except _Refused:
            await stream.reset()
            raise

    @staticmethod
    def _check(reply: Any, size: int | None) -> int:
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            err = reply.get("error") if isinstance(reply, dict) else None
            raise _Refused(f"refused: {err or reply!r}")
        total = reply.get("size")
        if (not isinstance(total, int) or isinstance(total, bool) or total < 0
                or (size is not None and total != size)):
            raise _Refused(f"it has {total!r} bytes, we want {size}")
        return total


class _BulkSession:
    """Pieces over one side channel; the libp2p stream stays open alongside it."""
    mode = "side channel"

    def __init__(self, fetcher: MeshFileFetcher, stream, chan: bulk.SyncChannel) -> None:
        self.stream = stream
        self.chan = chan
        self.buf = memoryview(bytearray(bulk.RECORD))

    async def get(self, offset: int, n: int, fd: int, pieces: _Pieces, s: _Source) -> None:
        await bulk.run_blocking(self._get, offset, n, fd, pieces, s,
                                abort=bulk.shutdown(self.chan.sock))

    def _get(self, offset: int, n: int, fd: int, pieces: _Pieces, s: _Source) -> None:
        got = 0
        try:
            self.chan.send(_RANGE.pack(offset, n))
            while got < n:
                k = self.chan.recv_into(self.buf)
                if k == 0:
                    raise _Broken(f"the peer closed the side channel at byte {offset + got}", got)
                if k > n - got:
                    raise _Refused("it sent more bytes than asked for")
                data = self.buf[:k]
                while data:
                    w = os.pwrite(fd, data, offset + got)
                    data = data[w:]
                    got += w
                    s.got += w
                pieces.add(k)
        except bulk.ChannelBroken as exc:
            raise _Broken(f"{exc.message} at byte {offset + got}", got) from None

    async def aclose(self) -> None:
        self.chan.close()
        await self.stream.close()


class _StreamSession:
    """Pieces over libp2p streams (v1): one stream per piece, reset once it has arrived."""
    mode = "libp2p stream"

    def __init__(self, fetcher: MeshFileFetcher, peer, sha256: str, size: int) -> None:
        self.f, self.peer, self.sha256, self.size = fetcher, peer, sha256, size

    async def get(self, offset: int, n: int, fd: int, pieces: _Pieces, s: _Source) -> None:
        f = self.f
        stream = None
        got = 0
        try:
            try:
                with trio.fail_after(f.open_timeout):
                    stream = await f.p2p.open_stream(self.peer.peer_id, PROTOCOL)
                    await stream.write(pack({"v": 1, "sha256": self.sha256, "offset": offset}))
                    await stream.close()          # half-close: the request is all we send
                    reply = await read_frame(stream)
            except trio.TooSlowError:
                raise _Broken(f"no answer within {f.open_timeout:.0f} s") from None
            except (MeshError, FrameError, ValueError) as exc:
                raise _Broken(getattr(exc, "message", None) or str(exc) or type(exc).__name__) from None
            f._check(reply, self.size)
            buf = bytearray()
            while got < n:
                chunk, reason = b"", f"nothing for {f.stall_timeout:.0f} s"
                with trio.move_on_after(f.stall_timeout):
                    try:
                        chunk = await stream.read(min(CHUNK, n - got - len(buf)))
                        reason = "the peer closed the stream"
                    except MeshError as exc:
                        reason = exc.message
                if not chunk:
                    got += await _flush(fd, buf, offset + got, s)
                    raise _Broken(f"{reason} at byte {offset + got}", got)
                buf += chunk
                pieces.add(len(chunk))
                if len(buf) >= CHUNK or got + len(buf) == n:
                    got += await _flush(fd, buf, offset + got, s)
        finally:
            if stream is not None:
                await stream.reset()

    async def aclose(self) -> None:
        pass


async def _flush(fd: int, buf: bytearray, at: int, s: _Source) -> int:
    n = len(buf)
    if n:
        data = bytes(buf)
        buf.clear()

        def write() -> None:
            view = memoryview(data)
            pos = at
            while view:
                w = os.pwrite(fd, view, pos)
                view, pos = view[w:], pos + w
        await trio.to_thread.run_sync(write)
        s.got += n
    return n
