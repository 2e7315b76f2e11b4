"""Installed models on disk: one directory per model, made official by its model.yaml.

Layout
    models_dir/
      <id>/                  the model's files (names from the gallery entry's `path`)
        model.yaml           written LAST and atomically by the installer; without it the
                             directory is an unfinished install and is not listed
        <file>.partial       a download in progress (resumed by the next install)
      .cache/                wheels the `pypi:` source downloads (deleted after the install)
      .locks/<id>.lock       flock held by whoever installs or removes <id>

model.yaml holds: id, name, backend, aliases, model_file, files [{path, uri, sha256, size}]
(sha256 always set: computed when the gallery did not pin it), `gallery_config` (the
entry's config as installed), `overrides` (the user's, via `set_overrides`) and `config`
(the two merged: what a backend gets).

Design notes
- Reading is cheap and lock-free: a model is installed iff model.yaml parses. Writers
  replace model.yaml with os.replace, so readers see the old or the new one, never half.
- `remove` takes the model's lock without waiting: removing a model while it is being
  installed is a Conflict, not a race.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import ValidationError

from gallery.catalog import FileSpec, GalleryEntry, ModelConfig
from mesh.errors import BadRequest, Conflict, DiskFull, GalleryError, NotFound

__all__ = ["InstalledModel", "Store", "MANIFEST"]

log = logging.getLogger("gallery.store")

MANIFEST = "model.yaml"
PARTIAL_SUFFIX = ".partial"


@dataclass
class InstalledModel:
    id: str
    backend: str
    aliases: list[str]
    path: Path                 # what the backend opens: the model file, or the dir (whisper)
    dir: Path
    config: dict[str, Any]     # effective: gallery config merged with the user's overrides
    files: list[FileSpec]
    size_bytes: int
    name: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [self.id, *self.aliases]

    def files_present(self) -> bool:
        """Every file is there with its recorded size (no hashing)."""
        for f in self.files:
            try:
                if (self.dir / f.path).stat().st_size != f.size:
                    return False
            except OSError:
                return False
        return True


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, recursing into dicts; a None in `over` deletes the key."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def effective_config(gallery_config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merged and validated config (BadRequest naming the bad key if the merge is invalid)."""
    merged = deep_merge(gallery_config, overrides)
    try:
        return ModelConfig.model_validate(merged).model_dump(exclude_none=True)
    except ValidationError as exc:
        e = exc.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        raise BadRequest(f"invalid model config {key}: {e['msg']}", param=key) from exc


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left writing {path}") from exc
        raise GalleryError(f"cannot write {path}: {exc.strerror or exc}") from exc


class Store:
    """The models directory of one node."""

    def __init__(self, models_dir: Path | str) -> None:
        self.models_dir = Path(models_dir).expanduser()

    # ------------------------------------------------------------------ paths
    @property
    def cache_dir(self) -> Path:
        return self.models_dir / ".cache"

    @property
    def locks_dir(self) -> Path:
        return self.models_dir / ".locks"

    def model_dir(self, model_id: str) -> Path:
        return self.models_dir / model_id

    def lock_path(self, model_id: str) -> Path:
        return self.locks_dir / f"{model_id}.lock"

    # ------------------------------------------------------------------ reading
    def _load(self, d: Path) -> InstalledModel | None:
        try:
            data = yaml.safe_load((d / MANIFEST).read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, yaml.YAMLError) as exc:
            log.warning("ignoring %s: unreadable %s (%s)", d, MANIFEST, exc)
            return None
        try:
            files = [FileSpec.model_validate(f) for f in data["files"]]
            model_file = data.get("model_file") or "."
            return InstalledModel(
                id=data["id"], backend=data["backend"], aliases=list(data.get("aliases") or []),
                path=d if model_file == "." else d / model_file, dir=d,
                config=dict(data.get("config") or {}), files=files,
                size_bytes=sum(f.size or 0 for f in files), name=data.get("name") or data["id"],
                overrides=dict(data.get("overrides") or {}))
        except (KeyError, TypeError, ValidationError) as exc:
            log.warning("ignoring %s: invalid %s (%s)", d, MANIFEST, exc)
            return None

    def by_id(self, model_id: str) -> InstalledModel | None:
        """The installed model with exactly this id (no alias lookup)."""
        if not model_id or model_id.startswith(".") or "/" in model_id:
            return None
        return self._load(self.model_dir(model_id))

    def list(self) -> list[InstalledModel]:
        """Installed models, sorted by id."""
        try:
            dirs = sorted(p for p in self.models_dir.iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            return []
        return [m for m in map(self._load, dirs) if m is not None]

    def get(self, name: str) -> InstalledModel | None:
        """The installed model with this id or alias (exact, then case-insensitive)."""
        m = self.by_id(name)
        if m is not None:
            return m
        models = self.list()
        for m in models:
            if name in m.aliases:
                return m
        folded = name.casefold()
        for m in models:
            if any(n.casefold() == folded for n in m.names()):
                return m
        return None

    def find_file_by_sha256(self, sha256: str) -> Path | None:
        """An installed file with this content (recorded sha256 and size still right)."""
        sha256 = sha256.lower()
        for m in self.list():
            for f in m.files:
                if f.sha256 == sha256:
                    p = m.dir / f.path
                    with contextlib.suppress(OSError):
                        if p.stat().st_size == f.size:
                            return p
        return None

    # ------------------------------------------------------------------ writing
    def write_manifest(self, entry: GalleryEntry, files: list[FileSpec],
                       overrides: dict[str, Any] | None = None) -> InstalledModel:
        """Record `entry` as installed with these (hashed) files: the install's last step."""
        overrides = dict(overrides or {})
        gallery_config = entry.config.model_dump(exclude_none=True)
        data = {
            "id": entry.id, "name": entry.name, "backend": entry.backend,
            "aliases": list(entry.aliases), "model_file": entry.model_file,
            "description": entry.description, "license": entry.license,
            "files": [f.model_dump() for f in files],
            "gallery_config": gallery_config, "overrides": overrides,
            "config": effective_config(gallery_config, overrides),
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        d = self.model_dir(entry.id)
        write_atomic(d / MANIFEST, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        m = self._load(d)
        if m is None:  # pragma: no cover - we just wrote it
            raise GalleryError(f"cannot read back {d / MANIFEST}")
        return m

    def set_overrides(self, name: str, overrides: dict[str, Any]) -> InstalledModel:
        """Merge user overrides into the model's config (a None value drops an override)."""
        m = self.get(name)
        if m is None:
            raise NotFound(f"model {name!r} is not installed", param="model")
        path = m.dir / MANIFEST
        data = yaml.safe_load(path.read_text("utf-8"))
        new = deep_merge(data.get("overrides") or {}, overrides)
        data["config"] = effective_config(data.get("gallery_config") or {}, new)
        data["overrides"] = new
        write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return self._load(m.dir) or m

    @contextlib.contextmanager
    def try_lock(self, model_id: str) -> Iterator[None]:
        """The model's install lock without waiting; Conflict if somebody holds it."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path(model_id), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Conflict(f"model {model_id!r} is being installed") from None
            yield
        finally:
            os.close(fd)

    def remove(self, name: str) -> None:
        """Delete an installed model (NotFound if absent, Conflict while it installs)."""
        m = self.get(name)
        if m is None:
            raise NotFound(f"model {name!r} is not installed", param="model")
        with self.try_lock(m.id):
            (m.dir / MANIFEST).unlink(missing_ok=True)    # not installed from here on
            shutil.rmtree(m.dir, ignore_errors=True)


# ------------------------------------------------ what peers may fetch from us
MAX_ADVERTISED = 512         # hashes gossiped (66 bytes each: ~34 KB of a 256 KB state)
_adverts: dict[Path, tuple[tuple, dict[str, Any]]] = {}


def advertisement(store: Store) -> dict[str, Any]:
    """The `NodeState.extra` entries that tell peers which files this node can serve:
    {"files": [sha256, ...]}, or {} when there are more than MAX_ADVERTISED."""
    key = store.models_dir
    sig = []
    with contextlib.suppress(OSError):
        with os.scandir(key) as it:
            for e in it:
                if e.name.startswith(".") or not e.is_dir():
                    continue
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(e.path, MANIFEST))
                    sig.append((e.name, st.st_mtime_ns, st.st_size))
    sig_t = tuple(sorted(sig))
    cached = _adverts.get(key)
    if cached is not None and cached[0] == sig_t:
        return cached[1]
    hashes = sorted({f.sha256 for m in store.list() if m.files_present()
                     for f in m.files if f.sha256})
    out: dict[str, Any] = {"files": hashes} if len(hashes) <= MAX_ADVERTISED else {}
    _adverts[key] = (sig_t, out)
    return out
