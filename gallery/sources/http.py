"""`https://`, `http://` and `hf://` sources: streamed with resume (module note of
gallery/installer.py, "Sources").
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse

import httpx
import trio

from mesh.errors import DiskFull, GalleryError
from gallery.transfer import _free_bytes, _Reporter, _Sink

log = logging.getLogger("gallery.installer")

HTTP_RETRIES = 5                   # consecutive failures without progress before giving up
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=15.0)   # per read: a stalled mirror is a drop
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
USER_AGENT = "inference-mesh-gallery/0.1"


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
