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

The token never travels over the wire in the clear, is never logged (``repr``/``str`` show
only the mesh id), and is stored 0600 by ``store_token``. The one time a token crosses the
wire is a rotation (below), inside an admitted, Noise-encrypted stream.

Rotation (``MeshSecrets``). ``mesh token rotate`` replaces the token without a restart:
the new token becomes ``current`` and the old one ``retiring`` until ``retire_at`` (wall
clock, the same deadline on every node). During the grace period a node *sends* with the
retiring keys (every member still holding only the old token can read it) and *accepts*
both; after it, it sends and accepts only the new one. Connections made during the grace
period stay up at its end only for peers that proved they hold the new token (a MAC of
their peer id with the new hmac key, gossiped: ``proof``); mesh/p2p/rekey.py has the
protocol. ``<home>/token`` then holds the new token and ``<home>/token-rotation.json``
(0600) the retiring one with its deadline and the fingerprints of every token retired
here, so a node restarted with its old ``--token`` uses the new one (``resolve_secrets``)
and one started with a fresh home and the old token is refused by the mesh.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesh.errors import BadRequest

__all__ = ["MeshKeys", "MeshSecrets", "Token", "new_token", "parse_token", "store_token", "load_token",
           "store_secrets", "resolve_secrets", "TOKEN_FILE", "ROTATION_FILE"]

TOKEN_PREFIX = "mesh1-"
SECRET_BYTES = 32            # 256-bit secret (design brief, "Protocols")
_CHECKSUM_BYTES = 4
_HKDF_SALT = b"inference-mesh/token/v1"
MESH_ID_HEX = 10             # see the module note: 15-byte DNS-SD limit minus "p2p-"
TOKEN_FILE = "token"         # <home>/token, mode 0600
ROTATION_FILE = "token-rotation.json"   # <home>/token-rotation.json, mode 0600 (see "Rotation")
MAX_GRACE = 7 * 24 * 3600    # s; the longest grace period a rotation may ask for
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

    @cached_property
    def fingerprint(self) -> str:
        """A public name for this token's secret (not enough to rebuild any key)."""
        return hashlib.sha256(b"inference-mesh/token/fingerprint|" + self.secret).hexdigest()[:32]

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


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def store_token(home: Path, token: Token | str) -> Path:
    """Write the token to ``<home>/token`` with mode 0600 (atomically); returns the path."""
    text = token.encode() if isinstance(token, Token) else parse_token(token).encode()
    path = Path(home) / TOKEN_FILE
    _write_private(path, text + "\n")
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


_PROOF_DOMAIN = b"mesh/rekey/1|"


class MeshSecrets:
    """The token(s) a node holds: ``current``, and during a rotation's grace period the
    ``retiring`` one until ``retire_at`` (see "Rotation" in the module note). Every layer
    that signs, seals or checks (pnet, admission, gossip) asks this object, each time, so a
    rotation takes effect without rebuilding anything."""

    def __init__(self, current: Token, retiring: Token | None = None, retire_at: float = 0.0,
                 superseded: Sequence[str] = ()) -> None:
        self.current = current
        self.retiring = retiring
        self.retire_at = retire_at if retiring is not None else 0.0
        self.superseded: list[str] = list(dict.fromkeys(superseded))   # fingerprints retired here

    def __repr__(self) -> str:
        return (f"MeshSecrets(mesh_id={self.mesh_id!r}, "
                f"retiring={self.retiring.mesh_id if self.retiring else None!r})")

    def in_grace(self, now: float | None = None) -> bool:
        return self.retiring is not None and (time.time() if now is None else now) < self.retire_at

    @property
    def mesh_id(self) -> str:
        return self.current.mesh_id

    @property
    def sending(self) -> MeshKeys:
        """The keys this node signs and encrypts with now."""
        return self.retiring.keys if self.in_grace() and self.retiring is not None else self.current.keys

    @property
    def accepted(self) -> list[MeshKeys]:
        """The keys this node accepts now, the current token's first."""
        keys = [self.current.keys]
        if self.in_grace() and self.retiring is not None:
            keys.append(self.retiring.keys)
        return keys

    def psks(self) -> tuple[bytes, list[bytes]]:
        return self.sending.psk, [k.psk for k in self.accepted]

    def hmac_keys(self) -> list[bytes]:
        return [k.hmac_key for k in self.accepted]

    def rotate(self, new: Token, retire_at: float) -> None:
        """``new`` becomes current; the current one retires at ``retire_at``."""
        if new == self.current:
            return
        self.retiring, self.retire_at = self.current, retire_at
        self.superseded = [*dict.fromkeys([*self.superseded, self.current.fingerprint])]
        self.current = new

    def retire(self) -> None:
        """The grace period is over: forget the retiring token."""
        self.retiring, self.retire_at = None, 0.0

    def proof(self, node_id: bytes) -> bytes:
        """What a node gossips to show it holds the current token (bound to its peer id)."""
        return hmac.new(self.current.keys.hmac_key, _PROOF_DOMAIN + node_id, hashlib.sha256).digest()

    def check_proof(self, node_id: bytes, proof: bytes) -> bool:
        return bool(proof) and hmac.compare_digest(proof, self.proof(node_id))


def store_secrets(home: Path, s: MeshSecrets) -> None:
    """``<home>/token`` (the current token) and ``<home>/token-rotation.json``, both 0600."""
    store_token(home, s.current)
    _write_private(Path(home) / ROTATION_FILE, json.dumps({
        "retiring": s.retiring.encode() if s.retiring else None, "retire_at": s.retire_at,
        "superseded": s.superseded}, indent=1) + "\n")


def resolve_secrets(home: Path, configured: Token) -> tuple[MeshSecrets, str]:
    """The secrets a node starts with, given the token it was configured with, and a note
    for the log ("" when there is nothing to say). A configured token that a rotation
    here superseded gives way to the stored current one; any other configured token wins
    (the operator gave this node a token by hand)."""
    home = Path(home)
    try:
        rot = json.loads((home / ROTATION_FILE).read_text())
        stored = load_token(home)
    except FileNotFoundError:
        return MeshSecrets(configured), ""
    except (ValueError, OSError, BadRequest) as exc:
        return MeshSecrets(configured), f"ignored {home / ROTATION_FILE}: {exc}"
    if stored is None or not isinstance(rot, dict):
        return MeshSecrets(configured), ""
    superseded = [str(f) for f in rot.get("superseded") or []]
    retiring = None
    if rot.get("retiring") and float(rot.get("retire_at") or 0) > time.time():
        try:
            retiring = parse_token(str(rot["retiring"]))
        except BadRequest:
            retiring = None
    secrets_ = MeshSecrets(stored, retiring, float(rot.get("retire_at") or 0), superseded)
    if configured == stored:
        return secrets_, ""
    if configured.fingerprint in superseded:
        return secrets_, (f"the configured mesh token (mesh {configured.mesh_id}) was rotated; this node "
                          f"uses the new one from {home / TOKEN_FILE} (mesh {stored.mesh_id}): "
                          "update --token / MESH_TOKEN")
    return MeshSecrets(configured), (f"the configured mesh token (mesh {configured.mesh_id}) is not the "
                                     f"one stored in {home / TOKEN_FILE}: using the configured one")
