"""The one error tree of inference-mesh.

    MeshError                      root: anything the product raises on purpose
    ├── BadRequest                 the caller sent something we cannot use       -> 400
    │   ├── PayloadTooLarge        body over the configured limit               -> 413
    │   └── UnsupportedMedia       audio we cannot decode                       -> 400
    ├── AuthError                  missing, unknown or revoked API key           -> 401
    ├── PermissionDenied           key lacks the feature                         -> 403
    ├── NotFound                   unknown route or resource                     -> 404
    │   └── ModelNotFound          no node of the mesh serves that model         -> 404
    ├── Conflict                   operation clashes with current state          -> 409
    ├── RateLimited                too many attempts / requests                  -> 429
    ├── GalleryError               install failed (source, checksum, disk)       -> 502
    │   ├── ChecksumMismatch
    │   └── DiskFull                                                             -> 507
    ├── Unavailable                cannot serve now (worker died, queue full)    -> 503
    │   ├── WorkerDied
    │   └── NoCapacity
    ├── PeerError                  a mesh peer failed or refused                 -> 502
    │   └── AdmissionDenied        peer failed the token handshake
    └── Timeout                    the request deadline passed                   -> 504

Lower-library errors are translated at the boundary with ``raise Ours(...) from exc``.
`api/errors.py` is the single place that turns these into HTTP responses.
"""

from __future__ import annotations

from typing import Any


class MeshError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.extra = extra or {}

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        err.update(self.extra)
        return {"error": err}


class BadRequest(MeshError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "payload_too_large"


class UnsupportedMedia(BadRequest):
    code = "unsupported_audio"


class AuthError(MeshError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(MeshError):
    status = 403
    type = "permission_error"
    code = "insufficient_permissions"


class NotFound(MeshError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(MeshError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(MeshError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class GalleryError(MeshError):
    status = 502
    type = "server_error"
    code = "install_failed"


class ChecksumMismatch(GalleryError):
    code = "checksum_mismatch"


class DiskFull(GalleryError):
    status = 507
    code = "disk_full"


class Unavailable(MeshError):
    status = 503
    type = "server_error"
    code = "unavailable"


class WorkerDied(Unavailable):
    code = "worker_died"


class NoCapacity(Unavailable):
    code = "no_capacity"


class PeerError(MeshError):
    status = 502
    type = "server_error"
    code = "peer_error"


class AdmissionDenied(PeerError):
    code = "admission_denied"


class Timeout(MeshError):
    status = 504
    type = "server_error"
    code = "timeout"
