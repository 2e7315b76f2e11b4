"""The gallery index: curated model entries, loaded from YAML and looked up by name.

Design notes
- The built-in `gallery/index.yaml` ships as package data (read with importlib.resources);
  users add index files or http(s) URLs (`--gallery`, MESH_GALLERY). Later indexes
  override earlier ones entry by entry (same id), and a later entry's aliases win.
- Entries are strict, frozen pydantic models: a typo in an index is an error at load
  time, reported as one readable line (`GalleryError`), not a KeyError at install time.
- `sha256: null` / `size: null` mean "not pinned": the installer computes and records
  them in the installed model's model.yaml. Pinned files are verified, and only pinned
  files may come from mesh peers.
- Lookup is by id or alias, exact first, then case-insensitive; an unknown name raises
  `ModelNotFound` with close names (difflib) so a typo gets a useful answer.
- Fetching a remote index is synchronous (httpx, 30 s): it happens once at start-up,
  before the node serves anything. Call it in a thread from async code.
"""

from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh.errors import GalleryError, ModelNotFound

__all__ = ["FileSpec", "Sampling", "ModelConfig", "GalleryEntry", "load_index", "parse_index",
           "resolve", "builtin_index_text"]

INDEX_VERSION = 1
REMOTE_INDEX_TIMEOUT = 30.0        # seconds; a start-up step, so fail rather than hang
ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,127}$"
SOURCE_SCHEMES = ("pypi:", "hf://", "https://", "http://", "file://")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSpec(_Strict):
    """One file of a model: where it comes from and what it must hash to.

    `uri` names one source; `parts` instead names several, whose bytes are joined in
    order into the one file (models shipped as raw chunks in several wheels); the
    sha256 and size are those of the joined file."""
    uri: str | None = None
    parts: list[str] | None = Field(None, min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    size: int | None = Field(None, ge=0)
    path: str                      # relative name inside the model's directory

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(SOURCE_SCHEMES):
            raise ValueError(f"unsupported source {v!r} (use one of {', '.join(SOURCE_SCHEMES)})")
        return v

    @field_validator("parts")
    @classmethod
    def _part_schemes(cls, v: list[str] | None) -> list[str] | None:
        for part in v or []:
            if not part.startswith(("pypi:", "file://")):
                raise ValueError(f"part {part!r}: parts come from pypi: or file:// sources")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "FileSpec":
        if (self.uri is None) == (self.parts is None):
            raise ValueError("a file needs exactly one of 'uri' and 'parts'")
        return self

    @property
    def sources(self) -> list[str]:
        """The sources whose bytes, in order, make the file."""
        return list(self.parts) if self.parts is not None else [self.uri]

    @property
    def origin(self) -> str:
        return self.uri if self.uri is not None else f"{self.parts[0]} (+{len(self.parts) - 1} parts)"

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = PurePosixPath(v)
        if (not v or p.is_absolute() or "\\" in v or any(part in ("", ".", "..") for part in v.split("/"))
                or p.name.startswith(".") or p.name == "model.yaml" or p.name.endswith(".partial")):
            raise ValueError(f"{v!r} is not a plain relative file name")
        return v


class Sampling(_Strict):
    """Default sampling parameters; a request's own values take precedence."""
    model_config = ConfigDict(extra="allow", frozen=True)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)


class ModelConfig(_Strict):
    """How a backend runs the model; every key may be overridden per node by the user."""
    context_size: int | None = Field(None, ge=16)
    # llama: slots (concurrent sequences); "auto": up to 8 as free RAM allows (node/placement.py)
    parallel: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    chat_template: str | None = None         # overrides the template in the GGUF metadata
    sampling: Sampling = Field(default_factory=Sampling)
    memory_estimate_mb: int | None = Field(None, ge=0)
    embeddings: bool | None = None           # llama: serve /v1/embeddings from this model
    threads: int | None = Field(None, ge=1)
    gpu_layers: int | None = None            # llama: -1 = all layers on the GPU
    compute_type: str | None = None          # whisper: CTranslate2 compute type (int8, ...)
    repack: bool | None = None               # llama: CPU weight repacking (node/rpc.py; MESH_REPACK)
    # llama: ms between two text events of a stream (node/backends/batching.py "Pacing")
    stream_interval_ms: float | None = Field(None, ge=0, le=1000)


class GalleryEntry(_Strict):
    id: str = Field(pattern=ID_PATTERN)
    name: str
    description: str = ""
    license: str | None = None
    backend: Literal["llama", "whisper", "piper"]
    aliases: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = Field(min_length=1)
    model_file: str | None = None
    config: ModelConfig = Field(default_factory=ModelConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_model_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("model_file") is None:
            files = data.get("files")
            if data.get("backend") == "whisper":
                data = {**data, "model_file": "."}
            elif isinstance(files, (list, tuple)) and len(files) == 1 and isinstance(files[0], dict):
                data = {**data, "model_file": files[0].get("path")}
        return data

    @model_validator(mode="after")
    def _check(self) -> GalleryEntry:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("two files share one path")
        if self.backend == "whisper":
            if self.model_file != ".":
                raise ValueError("a whisper model is its directory: model_file must be '.' or absent")
        elif self.model_file not in paths:
            raise ValueError("model_file must name one of the files (the one the backend opens)")
        if self.backend == "piper" and f"{self.model_file}.json" not in paths:
            raise ValueError("a piper voice needs its config beside it: add "
                             f"'{self.model_file}.json' to the files")
        if self.id in self.aliases:
            raise ValueError("an alias repeats the id")
        return self

    def all_names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


class _IndexFile(_Strict):
    version: int = INDEX_VERSION
    models: list[GalleryEntry]

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != INDEX_VERSION:
            raise ValueError(f"index version {v} is not supported (this is version {INDEX_VERSION})")
        return v


def builtin_index_text() -> str:
    return importlib.resources.files("gallery").joinpath("index.yaml").read_text("utf-8")


def _one_line(source: str, exc: ValidationError, data: Any) -> str:
    errs = exc.errors()
    first = errs[0]
    loc = list(first["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        try:
            where = f"model {data['models'][loc[1]].get('id', '#' + str(loc[1]))!r}: "
        except (KeyError, IndexError, TypeError, AttributeError):
            where = f"model #{loc[1]}: "
        loc = loc[2:]
    field = ".".join(str(p) for p in loc)
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"invalid gallery index {source}: {where}{field + ': ' if field else ''}{first['msg']}{more}"


def parse_index(text: str, source: str = "<index>") -> list[GalleryEntry]:
    """Entries of one index document; GalleryError with one readable line if it is invalid."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise GalleryError(f"invalid gallery index {source}:{at}: {problem}") from exc
    if isinstance(data, list):          # a bare list of entries is accepted too
        data = {"models": data}
    if not isinstance(data, dict):
        raise GalleryError(f"invalid gallery index {source}: expected a mapping with 'models'")
    try:
        parsed = _IndexFile.model_validate(data)
    except ValidationError as exc:
        raise GalleryError(_one_line(source, exc, data)) from exc
    seen: dict[str, str] = {}
    for entry in parsed.models:
        for name in entry.all_names():
            if name in seen:
                raise GalleryError(f"invalid gallery index {source}: {name!r} names both "
                                   f"{seen[name]!r} and {entry.id!r}")
            seen[name] = entry.id
    return parsed.models


def _read_source(src: str | Path) -> tuple[str, str]:
    s = str(src)
    if s.startswith(("http://", "https://")):
        import httpx
        try:
            r = httpx.get(s, timeout=REMOTE_INDEX_TIMEOUT, follow_redirects=True)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise GalleryError(f"cannot fetch gallery index {s}: {exc}") from exc
        return r.text, s
    path = Path(s[len("file://"):] if s.startswith("file://") else s).expanduser()
    try:
        return path.read_text("utf-8"), str(path)
    except OSError as exc:
        raise GalleryError(f"cannot read gallery index {path}: {exc.strerror or exc}") from exc


def load_index(extra: Iterable[str | Path] = ()) -> dict[str, GalleryEntry]:
    """The built-in index plus `extra` files or URLs; later entries replace earlier ones by id."""
    index: dict[str, GalleryEntry] = {}
    sources: list[tuple[str, str]] = [(builtin_index_text(), "gallery/index.yaml")]
    sources += [_read_source(src) for src in extra]
    for text, where in sources:
        for entry in parse_index(text, where):
            index.pop(entry.id, None)    # re-insert at the end: its aliases now win
            index[entry.id] = entry
    return index


def resolve(index: dict[str, GalleryEntry], name: str) -> GalleryEntry:
    """The entry whose id or alias is `name`; ModelNotFound suggesting close names otherwise."""
    if name in index:
        return index[name]
    entries = list(index.values())
    for entry in reversed(entries):            # later indexes win
        if name in entry.aliases:
            return entry
    folded = name.casefold()
    for entry in reversed(entries):
        if any(n.casefold() == folded for n in entry.all_names()):
            return entry
    owner = {n.casefold(): e.id for e in entries for n in e.all_names()}
    close = difflib.get_close_matches(folded, list(owner), n=6, cutoff=0.6)
    close += [n for n in owner if folded and len(folded) >= 3 and folded in n and n not in close]
    suggestions = list(dict.fromkeys(owner[n] for n in close))[:3]
    hint = f"; did you mean: {', '.join(suggestions)}?" if suggestions else " (not in the gallery)"
    raise ModelNotFound(f"unknown model {name!r}{hint}", param="model")

