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
import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from cvmfs_snap.errors import IntegrityError
from cvmfs_snap.layer.paths import CAPABILITY_XATTR, FORBIDDEN_XATTR_PREFIXES

log = logging.getLogger(__name__)

#: bytes copied into one layer's mask at most (xattr and hard-link copy-ups), by default
DEFAULT_COPY_LIMIT = 256 << 20
_CHUNK = 1 << 20


class MaskTree(Protocol):
    """The mask being built (:class:`.overlaydirs._TreeBuilder`): where copies go, and the layerfs they mirror."""

    root: Path
    layerfs: Path
    digest: str
    entries: int
    dir_xattrs: dict[tuple[str, ...], dict[str, bytes]]

    def layerfs_is_dir(self, parts: tuple[str, ...]) -> bool: ...

    def ensure_dir(self, parts: tuple[str, ...]) -> bool: ...


def allowed_xattr(name: str) -> bool:
    """Names an image may set on a node-local copy: never overlay's own, never the build machine's SELinux label."""
    if name.startswith(FORBIDDEN_XATTR_PREFIXES):
        return False
    return name == CAPABILITY_XATTR or name.startswith(("user.", "trusted."))


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


def restore_lost(tree: MaskTree, recorded_xattrs: dict[str, dict[str, str]],
                 hardlinks: Iterable[tuple[str, str]], split: Callable[[str], tuple[str, ...]],
                 copy_limit: int) -> None:
    """Put into the mask copies carrying the recorded xattrs, and the second names of hard links linked to the
    first one's copy (see the module doc). ``split`` turns a recorded path into checked components."""
    budget = [copy_limit]
    left_out: list[str] = []
    for path, recorded in recorded_xattrs.items():
        parts = split(path)
        xattrs = decode_xattrs(recorded, path, tree.digest)
        if not xattrs:
            continue
        if tree.layerfs_is_dir(parts):
            tree.ensure_dir(parts)
            tree.dir_xattrs[parts] = xattrs
            tree.entries += 1
        elif not _copy_up(tree, parts, xattrs, budget):
            left_out.append(path)
    for path, target in hardlinks:
        parts, tparts = split(path), split(target)
        if not parts or not tparts or not tree.ensure_dir(parts[:-1]):
            continue
        if not _copy_up(tree, tparts, {}, budget):
            left_out.append(path)
            continue
        dst = tree.root.joinpath(*parts)
        if os.path.lexists(dst):
            if not stat.S_ISREG(os.lstat(dst).st_mode):
                continue  # a whiteout the mask needs there (the name is hidden)
            os.unlink(dst)
        os.link(tree.root.joinpath(*tparts), dst)
        _link_header_meta(tree.layerfs.joinpath(*parts), dst)
    if left_out:
        log.warning("layer %s: more than %d bytes of files carry xattrs or hard links CVMFS lost; %d of them "
                    "(first: %s) are served without their xattrs or shared inode (docs/snapshotter.md)",
                    tree.digest, copy_limit, len(left_out), left_out[:3])


def _copy_up(tree: MaskTree, parts: tuple[str, ...], xattrs: dict[str, bytes], budget: list[int]) -> bool:
    """Copy the layerfs's regular file ``parts`` into the mask (once) with ``xattrs``; False if over budget.
    Paths that are not regular files of the layerfs are left alone (True)."""
    if not parts or not tree.layerfs_is_dir(parts[:-1]):
        return True
    src, dst = tree.layerfs.joinpath(*parts), tree.root.joinpath(*parts)
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return True
    if not stat.S_ISREG(st.st_mode):
        return True
    if os.path.lexists(dst):
        if stat.S_ISREG(os.lstat(dst).st_mode):
            set_xattrs(dst, xattrs)
        return True
    if st.st_size > budget[0]:
        return False
    tree.ensure_dir(parts[:-1])
    budget[0] -= copy_file(src, dst)
    set_xattrs(dst, xattrs)
    copy_times(src, dst)
    tree.entries += 1
    return True


def _link_header_meta(src: Path, dst: Path) -> None:
    """containerd applies a hard link header's owner, mode and times to the shared inode (the last header wins);
    ingest stored that header as the copy ``src``, so its metadata goes onto the inode both names share."""
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        os.lchown(dst, st.st_uid, st.st_gid)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
