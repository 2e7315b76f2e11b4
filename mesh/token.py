"""The mesh token: one shared secret from which every mesh key is derived.

Format (version 1)::

    mesh1-<base32(payload || checksum)>        lowercase, no padding; parsed case-insensitively
    payload  = secret (32 random bytes) [ || "\\n".join(bootstrap multiaddrs) in UTF-8 ]
    checksum = sha256(b"mesh1" || payload)[:4]  catches typos and truncated copy-paste

Base32 (RFC 4648) keeps the token to letters and digits, so it survives shells, YAML and
chat clients; the checksum turns a mangled token into a readable "checksum mismatch"
rather than a node that silently forms a mesh of one.

Keys (HKDF-SHA256, salt ``_HKDF_SALT``, one ``info`` label per key, so learning one key
reveals nothing about another or about the secret):

- ``psk``      32 bytes: the private-network key that wraps every TCP connection (mesh/p2p/host.py).
- ``hmac_key`` 32 bytes: signs gossip envelopes (mesh/wire/state.py) and the admission handshake
               (mesh/p2p/admission.py).
- ``mesh_id``  10 hex characters (40 bits): a public name for the mesh, used in the mDNS
               service type ``_p2p-<mesh_id>._udp.local.`` so two meshes on one LAN ignore
               each other. 10 is the most that fits: DNS-SD service names are at most 15
               bytes and ``p2p-`` takes 4 (zeroconf enforces it). It is not a secret.

The token never travels over the wire, is never logged (``repr``/``str`` show only the
mesh id), and is stored 0600 by ``store_token``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesh.errors import BadRequest

__all__ = ["MeshKeys", "Token", "new_token", "parse_token", "store_token", "load_token", "TOKEN_FILE"]

TOKEN_PREFIX = "mesh1-"
SECRET_BYTES = 32            # 256-bit secret (design brief, "Protocols")
_CHECKSUM_BYTES = 4
_HKDF_SALT = b"inference-mesh/token/v1"
MESH_ID_HEX = 10             # see the module note: 15-byte DNS-SD limit minus "p2p-"
TOKEN_FILE = "token"         # <home>/token, mode 0600
_MAX_TOKEN_CHARS = 8192      # a token with a handful of bootstrap addresses is ~300
_B32_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


@dataclass(frozen=True)
class MeshKeys:
    """Keys derived from a token. ``repr`` hides the secrets."""

    psk: bytes = field(repr=False)
    hmac_key: bytes = field(repr=False)
    mesh_id: str


def _hkdf(secret: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT, info=label).derive(secret)


@dataclass(frozen=True, repr=False, eq=True)
class Token:
    """A parsed mesh token. Build it with ``parse_token``; ``encode()`` gives the string back."""

    secret: bytes
    bootstrap: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.secret) != SECRET_BYTES:
            raise BadRequest(f"token secret must be {SECRET_BYTES} bytes", param="token")

    @cached_property
    def keys(self) -> MeshKeys:
        return MeshKeys(
            psk=_hkdf(self.secret, b"libp2p-psk", 32),
            hmac_key=_hkdf(self.secret, b"hmac", 32),
            mesh_id=_hkdf(self.secret, b"mesh-id", MESH_ID_HEX // 2).hex(),
        )

    @property
    def mesh_id(self) -> str:
        return self.keys.mesh_id

    def encode(self) -> str:
        """The token string (``mesh1-...``). Treat the result as a secret."""
        payload = self.secret + "\n".join(self.bootstrap).encode()
        check = hashlib.sha256(TOKEN_PREFIX[:-1].encode() + payload).digest()[:_CHECKSUM_BYTES]
        body = base64.b32encode(payload + check).decode().rstrip("=").lower()
        return TOKEN_PREFIX + body

    def __repr__(self) -> str:
        return f"Token(mesh_id={self.mesh_id!r}, bootstrap={list(self.bootstrap)!r})"

    __str__ = __repr__


def new_token(bootstrap: Sequence[str] = ()) -> str:
    """A fresh token string with a new 256-bit secret (and optional bootstrap multiaddrs)."""
    return Token(secrets.token_bytes(SECRET_BYTES), _check_bootstrap(bootstrap)).encode()


def _check_bootstrap(addrs: Sequence[str]) -> tuple[str, ...]:
    out = []
    for a in addrs:
        a = a.strip()
        if not a.startswith("/") or any(c.isspace() for c in a):
            raise BadRequest(f"bootstrap address {a!r} is not a multiaddr (e.g. /ip4/10.0.0.2/tcp/4001)",
                             param="token")
        out.append(a)
    return tuple(out)


def parse_token(s: str) -> Token:
    """Parse a token string; raises BadRequest with a readable reason on anything else."""
    if not isinstance(s, str) or not s.strip():
        raise BadRequest("empty mesh token (create one with `mesh token`)", param="token")
    s = "".join(s.split())  # tolerate line breaks and spaces from copy-paste
    if len(s) > _MAX_TOKEN_CHARS:
        raise BadRequest("mesh token is too long", param="token")
    if not s.lower().startswith(TOKEN_PREFIX):
        head = s.split("-", 1)[0][:12] if "-" in s else ""
        if head.lower().startswith("mesh"):
            raise BadRequest(f"unsupported mesh token version {head!r} (this node reads {TOKEN_PREFIX!r})",
                             param="token")
        raise BadRequest(f"not a mesh token: it must start with {TOKEN_PREFIX!r} (create one with `mesh token`)",
                         param="token")
    body = s[len(TOKEN_PREFIX):].upper()
    bad = sorted(set(body) - _B32_ALPHABET)
    if bad:
        raise BadRequest(f"mesh token is damaged: unexpected character(s) {''.join(bad).lower()!r} "
                         "(a token has only letters and the digits 2-7)", param="token")
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError as exc:
        raise BadRequest("mesh token is damaged: wrong length (was it cut off when copied?)",
                         param="token") from exc
    if len(raw) < SECRET_BYTES + _CHECKSUM_BYTES:
        raise BadRequest("mesh token is too short (was it cut off when copied?)", param="token")
    payload, check = raw[:-_CHECKSUM_BYTES], raw[-_CHECKSUM_BYTES:]
    want = hashlib.sha256(TOKEN_PREFIX[:-1].encode() + payload).digest()[:_CHECKSUM_BYTES]
    if not secrets.compare_digest(check, want):
        raise BadRequest("mesh token checksum mismatch (a typo, or part of it is missing)", param="token")
    secret, rest = payload[:SECRET_BYTES], payload[SECRET_BYTES:]
    try:
        text = rest.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest("mesh token is damaged: bad bootstrap section", param="token") from exc
    return Token(secret, _check_bootstrap([a for a in text.split("\n") if a]))


def store_token(home: Path, token: Token | str) -> Path:
    """Write the token to ``<home>/token`` with mode 0600 (atomically); returns the path."""
    text = token.encode() if isinstance(token, Token) else parse_token(token).encode()
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / TOKEN_FILE
    tmp = home / f".{TOKEN_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (text + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def load_token(home: Path) -> Token | None:
    """The stored token, or None when there is none. Tightens a too-open file to 0600."""
    path = Path(home) / TOKEN_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & 0o077:
        os.chmod(path, 0o600)
    return parse_token(path.read_text())
