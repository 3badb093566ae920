"""Node-local copy-ups that give back what ``cvmfs_server ingest`` loses: extended attributes and hard links.

``layer.json`` records them (docs/layout.md: ``xattrs``, ``hardlinks``); :mod:`.overlaydirs` puts, in a layer's mask
(the lowerdir above the ``layerfs``), a copy of each such file (same content, owner, mode, times) carrying the
recorded xattrs, and links the second name of a hard link to the first one's copy, so overlayfs shows one inode for
both. Directories get their xattrs on the mask's directory. Copies are bounded per layer (``copy_limit`` bytes);
what does not fit is logged once and left as CVMFS has it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from cvmfs_snap.errors import IntegrityError

#: bytes copied into one layer's mask at most (xattr and hard-link copy-ups), by default
DEFAULT_COPY_LIMIT = 256 << 20
_CHUNK = 1 << 20


def allowed_xattr(name: str) -> bool:
    """Names an image may set on a node-local copy: never overlay's own, never the build machine's SELinux label."""
    if name.startswith(("trusted.overlay.", "user.overlay.")):
        return False
    return name == "security.capability" or name.startswith(("user.", "trusted."))


def decode_xattrs(values: dict[str, str], path: str, digest: str) -> dict[str, bytes]:
    """The recorded (base64) xattrs of one path that may be restored; IntegrityError on a malformed value."""
    out: dict[str, bytes] = {}
    for name, b64 in values.items():
        if not allowed_xattr(name):
            continue
        try:
            out[name] = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise IntegrityError(f"layer {digest}: layer.json has a malformed value of xattr {name!r} of "
                                 f"{path[:200]!r} ({exc}); republish the layer") from exc
    return out


def set_xattrs(dst: Path, xattrs: dict[str, bytes]) -> None:
    for name, value in xattrs.items():
        os.setxattr(dst, name, value, follow_symlinks=False)


def copy_file(src: Path, dst: Path) -> int:
    """Copy the regular file ``src`` (never following a symlink) to the new ``dst``: content, owner, mode, times.
    Returns the bytes copied."""
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd_in)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"{src} is not a regular file")
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            copied = 0
            while True:
                chunk = os.read(fd_in, _CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd_out, view):]
                copied += len(chunk)
            os.fchown(fd_out, st.st_uid, st.st_gid)
            os.fchmod(fd_out, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return copied


def copy_times(src: Path, dst: Path) -> None:
    st = os.lstat(src)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
