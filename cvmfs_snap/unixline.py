"""One request line -> one answer line over a unix stream socket: the blocking client half shared by the lazyfs
control protocol (:mod:`cvmfs_snap.lazyfs.control`) and the snapshotter's credentials socket
(:mod:`cvmfs_snap.snapshotter.credentials`). Each caller parses the answer and words its own errors."""

from __future__ import annotations

import socket
from pathlib import Path


def exchange(sock: Path | str, line: bytes, *, timeout: float, limit: int) -> bytes | None:
    """Connect to ``sock``, send ``line`` (newline-terminated) and read the answer up to its newline or the end of
    the connection. None when the answer grows past ``limit`` bytes; OSError when nobody answers in ``timeout``."""
    buf = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(line)
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > limit:
                return None
    return bytes(buf)
