"""The one error tree of inference-mesh.

    MeshError                      root: anything the product raises on purpose
    ├── BadRequest                 the caller sent something we cannot use
    │   ├── PayloadTooLarge        body over the configured limit
    │   └── UnsupportedMedia       audio we cannot decode
    ├── AuthError                  missing, unknown or revoked API key
    ├── PermissionDenied           key lacks the feature
    ├── NotFound                   unknown route or resource
    │   └── ModelNotFound          no node of the mesh serves that model
    ├── Conflict                   operation clashes with current state
    ├── RateLimited                too many attempts / requests
    ├── GalleryError               install failed (source, checksum, disk)
    │   ├── ChecksumMismatch
    │   └── DiskFull
    ├── BackendError               the model's backend failed on a valid request
    ├── Unavailable                cannot serve now; another node may          (retryable)
    │   ├── WorkerDied             the worker process died mid-request
    │   └── NoCapacity             queue full
    ├── PeerError                  a mesh peer failed or refused                (retryable)
    │   ├── PeerSilent             a serving peer stopped sending (no heartbeat)
    │   ├── AdmissionDenied        peer failed the token handshake
    │   └── BadMessage             a wire message that is malformed or unsigned
    └── Timeout                    the request deadline passed

Lower-library errors are translated at the boundary with ``raise Ours(...) from exc``.
This module knows nothing of HTTP: api/errors.py holds THE table from these classes to an
HTTP status and an OpenAI error type. The router (mesh/router.py) retries on the next
candidate only for ``RETRYABLE`` errors raised before a request's first event. A typed
error crosses processes and peers as a ``Failed`` event carrying its class name
(mesh/wire/inference.py), rebuilt here by ``by_name``.
"""

from __future__ import annotations

from typing import Any


class MeshError(Exception):
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.extra = extra or {}


class BadRequest(MeshError):
    code = "invalid_request"


class PayloadTooLarge(BadRequest):
    code = "payload_too_large"


class UnsupportedMedia(BadRequest):
    code = "unsupported_audio"


class AuthError(MeshError):
    code = "invalid_api_key"


class PermissionDenied(MeshError):
    code = "insufficient_permissions"


class NotFound(MeshError):
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(MeshError):
    code = "conflict"


class RateLimited(MeshError):
    code = "rate_limit_exceeded"


class GalleryError(MeshError):
    code = "install_failed"


class ChecksumMismatch(GalleryError):
    code = "checksum_mismatch"


class DiskFull(GalleryError):
    code = "disk_full"


class BackendError(MeshError):
    code = "backend_error"


class Unavailable(MeshError):
    code = "unavailable"


class WorkerDied(Unavailable):
    code = "worker_died"


class NoCapacity(Unavailable):
    code = "no_capacity"


class PeerError(MeshError):
    code = "peer_error"


class PeerSilent(PeerError):
    code = "peer_silent"


class AdmissionDenied(PeerError):
    code = "admission_denied"


class BadMessage(PeerError):
    code = "bad_message"


class Timeout(MeshError):
    code = "timeout"


RETRYABLE = (Unavailable, PeerError)


def _all(cls: type[MeshError]) -> list[type[MeshError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _all(sub)
    return out


def name_of(exc: MeshError) -> str:
    """The name of the most specific class of this tree `exc` is (a subclass defined
    elsewhere, such as a backend's RequestError, travels as its parent here)."""
    for cls in type(exc).__mro__:
        if cls.__module__ == __name__:
            return cls.__name__
    return MeshError.__name__


def by_name(name: str) -> type[MeshError]:
    """The class of the tree called `name`; the root for a name this node does not know."""
    for cls in _all(MeshError):
        if cls.__name__ == name:
            return cls
    return MeshError
