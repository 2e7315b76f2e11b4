"""The lender's llama.cpp RPC server in a network namespace of its own.

llama.cpp's RPC server has no authentication (and has had remote-code-execution
advisories), so it must not be reachable by any process but this node. Loopback is not
enough: any local user can connect to 127.0.0.1. So the server process (node/rpc.py)
starts by moving into a new, empty network namespace (`unshare(CLONE_NEWNET)`; as a
non-root user together with a new user namespace, which Linux allows unprivileged where
`user.max_user_namespaces` > 0), brings its loopback up and binds 127.0.0.1 *there*: no
socket of the host's network namespace can reach it, whatever its user.

The node still needs connections to it. It keeps one end of a Unix socket pair the child
inherited (the control socket; nothing else can open it): for each connection it sends
`c`, the child connects to its own 127.0.0.1:port and hands the connected socket back
with SCM_RIGHTS (`k` + the descriptor; `e` + a reason when the connect failed). A passed
socket keeps its namespace, so the node reads and writes the server's connection
directly: no relay, no extra copy. The same control socket says when the server
listens (`ready`: the child sees its port in LISTEN in its own /proc/net/tcp) and which
isolation applies; its EOF tells the child that the node is gone.

Where the kernel refuses the namespaces (a container without CAP_SYS_ADMIN and user
namespaces off), the server binds the host's loopback as before and the isolation reads
`none: <why>` in the gossiped state, `mesh status --wide` and `mesh doctor`.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import json
import os
import socket
import struct

__all__ = ["isolate_network", "listening", "serve_control", "recv_socket", "NETNS"]

NETNS = "netns"
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH22x")        # struct ifreq: name, flags, the union's rest


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def isolate_network() -> str:
    """Move this (single-threaded) process into a new network namespace with its loopback
    up. Returns NETNS, or `none: <why>` when the kernel refuses (the process then stays in
    the host's namespace)."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        if uid == 0:
            _unshare(CLONE_NEWNET)
        else:
            _unshare(CLONE_NEWUSER | CLONE_NEWNET)
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError as exc:
        return f"none: no network namespace ({exc.strerror or exc})"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            got = fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
            flags = _IFREQ.unpack(got)[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | IFF_UP))
    except OSError as exc:   # a namespace without loopback cannot serve at all
        raise SystemExit(f"cannot bring loopback up in the RPC server's namespace: {exc}")
    return NETNS


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port in this process's network namespace."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[1] == want and cols[3] == "0A":     # 0A: TCP_LISTEN
                    return True
    except OSError:
        return False
    return False


def serve_control(ctrl: socket.socket, port: int, isolation: str) -> None:
    """Child side: say ready, then hand out connections to 127.0.0.1:port until the node
    closes its end (then exit)."""
    ctrl.sendall(json.dumps({"ready": True, "isolation": isolation}).encode() + b"\n")
    while True:
        try:
            cmd = ctrl.recv(1)
        except OSError:
            cmd = b""
        if not cmd:
            os._exit(0)          # the node is gone (or closed us): so is its server
        if cmd != b"c":
            continue
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError as exc:
            ctrl.sendall(b"e" + str(exc).encode()[:200] + b"\n")
            continue
        try:
            socket.send_fds(ctrl, [b"k"], [conn.fileno()])
        finally:
            conn.close()


def recv_socket(data: bytes, ancdata: list) -> socket.socket | None:
    """Parent side: the socket in a `k` reply's SCM_RIGHTS (None for anything else)."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if data[:1] != b"k" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None
    return socket.socket(fileno=fds[0])
