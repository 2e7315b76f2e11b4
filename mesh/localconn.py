"""Which local process holds the other end of a loopback TCP connection (Linux).

The RPC tunnel's local ends (mesh/tunnel.py `serve_tunnel`) listen on 127.0.0.1 for the
split model's worker; any local process could connect there and be carried to a peer's
unauthenticated llama.cpp RPC server. So each accepted connection is checked first: the
client socket's inode is found in /proc/net/tcp (the line whose local address is our
peer's and whose remote address is ours), and the connection is kept only if one of the
allowed processes (the node's own children) holds that inode among its open files
(/proc/PID/fd/* -> `socket:[INODE]`). A few hundred microseconds per connection;
llama.cpp opens a handful per server while it loads and then keeps one.

Without /proc (not Linux) nothing can be proven, and `owner_pid` returns None: the
caller refuses the connection.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

__all__ = ["owner_pid", "socket_inode"]


def _hex_addr(host: str, port: int, family: int) -> str:
    raw = socket.inet_pton(family, host)
    if family == socket.AF_INET:
        return f"{int.from_bytes(raw, 'little'):08X}:{port:04X}"
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def socket_inode(local: tuple, remote: tuple, family: int = socket.AF_INET) -> int | None:
    """The inode of the socket whose local address is `local` and remote is `remote`
    (host, port) in this network namespace, or None."""
    table = "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"
    want_l = _hex_addr(local[0], local[1], family)
    want_r = _hex_addr(remote[0], remote[1], family)
    try:
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[1] == want_l and cols[2] == want_r:
                    return int(cols[9])
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return None


def _holds(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def owner_pid(sock: socket.socket, pids: Iterable[int]) -> int | None:
    """Which of `pids` holds the client end of the accepted connection `sock`, or None
    (someone else, or it cannot be told)."""
    try:
        here, there = sock.getsockname()[:2], sock.getpeername()[:2]
    except OSError:
        return None
    inode = socket_inode(there, here, sock.family)
    if inode is None:
        return None
    for pid in pids:
        if _holds(pid, inode):
            return pid
    return None
