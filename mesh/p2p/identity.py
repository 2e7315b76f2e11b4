"""The node's persistent libp2p identity: an Ed25519 key pair in ``<home>/identity.key``.

The peer id is derived from the public key, so the same file gives the same peer id after
a restart; peers, logs and ``mesh status`` can rely on it. The file holds the libp2p
protobuf encoding of the private key (what ``libp2p.crypto.serialization`` reads), is
written 0600 to a temporary file and hard-linked into place (atomic and never overwrites,
so two processes starting at once end up sharing one key), and is tightened to 0600 if
found more open.
"""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from mesh.errors import BadRequest

__all__ = ["IDENTITY_FILE", "load_or_create_identity", "peer_id_of"]

IDENTITY_FILE = "identity.key"


def _read(path: Path) -> KeyPair:
    st = path.stat()
    if st.st_mode & 0o077:
        os.chmod(path, 0o600)
    try:
        priv = deserialize_private_key(path.read_bytes())
    except Exception as exc:
        raise BadRequest(f"{path}: not a libp2p private key ({exc}); move it away to create a new identity") from exc
    return KeyPair(priv, priv.get_public_key())


def load_or_create_identity(home: Path) -> KeyPair:
    """Load ``<home>/identity.key``, creating it (0600) on first use."""
    home = Path(home)
    path = home / IDENTITY_FILE
    if path.exists():
        return _read(path)
    home.mkdir(parents=True, exist_ok=True)
    kp = create_new_key_pair()
    tmp = home / f".{IDENTITY_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, kp.private_key.serialize())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic and refuses to overwrite: never two identities
    except FileExistsError:  # another process won the race: use its key
        return _read(path)
    finally:
        tmp.unlink(missing_ok=True)
    return kp


def peer_id_of(kp: KeyPair) -> str:
    return ID.from_pubkey(kp.public_key).to_base58()
