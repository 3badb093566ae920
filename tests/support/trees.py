"""The one way the tests list a directory tree to compare two views of it (:func:`listing`), and a sparse-tar
builder."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from cvmfs_snap.fsutil import walk_fd
from cvmfs_snap.layer.paths import FORBIDDEN_XATTR_PREFIXES  # overlayfs's own bookkeeping, not image content

TYPES = frozenset({"dir", "file", "symlink", "char", "block", "fifo", "socket"})
NON_DIRS = TYPES - {"dir"}

Record = dict[str, Any]
Listing = dict[str, Record]

_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def listing(root: Path, *, content: Literal["sha256", "bytes"] | None = "sha256", modes: bool = True,
            owners: bool = True, xattrs: bool = True, hardlinks: bool = True, nlink: bool = False,
            mtimes: Collection[str] = (), skip: Collection[str] = (), skip_names: Collection[str] = (),
            ignore_xattrs: tuple[str, ...] = (), include_root: bool = False) -> Listing:
    """Every entry below ``root`` as a comparable record, keyed by its path relative to ``root`` (``"."`` is the
    root itself when ``include_root``). The walk is :func:`cvmfs_snap.fsutil.walk_fd` (no recursion, never
    follows a symlink).

    A record always has ``type`` (one of :data:`TYPES`), plus ``target`` of a symlink and ``rdev`` ([major, minor])
    of a device, and as asked: ``mode`` (permission bits with set-id/sticky, as ``oct()``), ``uid``/``gid``;
    regular files' ``size`` and ``sha256`` (``content="sha256"``) or ``data`` (``"bytes"``); ``xattrs`` (name ->
    hex value, names starting with ``ignore_xattrs`` left out); ``hardlinks`` (all paths of the listing that share
    a non-directory's inode, when there are several); ``nlink``; ``mtime`` (ns) of the types named in ``mtimes``
    (e.g. :data:`TYPES` or :data:`NON_DIRS`). Paths in ``skip`` (relative to ``root``) and entries named as in
    ``skip_names`` (anywhere) are left out with all below them.
    """
    out: Listing = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def record(rel: str, name: str, fd: int) -> None:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "other")
        rec: Record = {"type": kind}
        if modes:
            rec["mode"] = oct(stat.S_IMODE(st.st_mode))
        if owners:
            rec["uid"], rec["gid"] = st.st_uid, st.st_gid
        if kind == "file" and content is not None:
            rec["size"] = st.st_size
            rec["sha256" if content == "sha256" else "data"] = _read(name, fd, content)
        elif kind == "symlink":
            rec["target"] = os.readlink(name, dir_fd=fd)
        elif kind in ("char", "block"):
            rec["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        if xattrs:
            rec["xattrs"] = _xattrs(f"/proc/self/fd/{fd}/{name}", ignore_xattrs)
        if nlink and kind != "dir":
            rec["nlink"] = st.st_nlink
        if kind in mtimes:
            rec["mtime"] = st.st_mtime_ns
        if kind != "dir":
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        out[rel] = rec

    skipped, skipped_names = set(skip), set(skip_names)

    def wanted(rel_dir: str, name: str) -> bool:
        return name not in skipped_names and _join(rel_dir, name) not in skipped

    for rel_dir, fd, dirnames, filenames in walk_fd(root):
        dirnames[:] = [n for n in dirnames if wanted(rel_dir, n)]
        if not rel_dir and include_root:
            record(".", ".", fd)
        for n in sorted(dirnames + filenames):
            if wanted(rel_dir, n):
                record(_join(rel_dir, n), n, fd)
    if hardlinks:
        for same in inodes.values():
            if len(same) > 1:
                for rel in same:
                    out[rel]["hardlinks"] = sorted(same)
    return dict(sorted(out.items()))


def view_listing(root: Path) -> Listing:
    """:func:`listing` of a mounted container view (a snapshot's mount): the root too, link counts, and no
    overlayfs bookkeeping xattrs."""
    return listing(root, include_root=True, nlink=True, ignore_xattrs=FORBIDDEN_XATTR_PREFIXES)


def names(root: Path, *, skip: Collection[str] = ()) -> list[str]:
    """The sorted relative paths below ``root`` (for "nothing else was written" checks)."""
    return list(listing(root, content=None, modes=False, owners=False, xattrs=False, hardlinks=False, skip=skip))


def shape(root: Path, *, skip_names: Collection[str] = ()) -> Listing:
    """Only the types and symlink targets below ``root`` (for "the layout stayed as it was" checks)."""
    return listing(root, content=None, modes=False, owners=False, xattrs=False, hardlinks=False,
                   skip_names=skip_names)


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


def _read(name: str, dir_fd: int, content: str) -> str | bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        if content == "bytes":
            return f.read()
        return hashlib.file_digest(f, "sha256").hexdigest()


def _xattrs(path: str, ignore: tuple[str, ...]) -> dict[str, str]:
    try:
        found = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in sorted(found):
        if ignore and n.startswith(ignore):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False).hex()
        except OSError as exc:
            out[n] = f"<error {exc.errno}>"
    return out


def diff(a: Listing, b: Listing, a_name: str = "first", b_name: str = "second") -> list[str]:
    """Readable differences between two :func:`listing` results (empty when equal)."""
    lines = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            lines.append(f"only in {b_name}: {k} {b[k]}")
        elif k not in b:
            lines.append(f"only in {a_name}: {k} {a[k]}")
        elif a[k] != b[k]:
            fields = sorted(f for f in set(a[k]) | set(b[k]) if a[k].get(f) != b[k].get(f))
            lines.append(f"{k} ({a_name} != {b_name}): "
                         + ", ".join(f"{f}: {a[k].get(f)!r} != {b[k].get(f)!r}" for f in fields))
    return lines


def sparse_tar(tmp: Path, fmt: list[str]) -> bytes:
    """A tar made by GNU tar (``--sparse`` with the format options ``fmt``) of two sparse files, a hole inside and a
    hole at the end; the source files stay in ``tmp/sparse-src`` to compare with."""
    src = tmp / "sparse-src"
    src.mkdir(exist_ok=True)
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"middle" * 1000)
        f.seek(5 << 20)
        f.write(b"tail")
    with open(src / "hole-at-end", "wb") as f:
        f.write(b"x" * 10000)
        f.truncate(2 << 20)
    out = tmp / "s.tar"
    subprocess.run(["tar", "--sparse", *fmt, "-cf", str(out), "-C", str(src), "sparse", "hole-at-end"], check=True)
    return out.read_bytes()
