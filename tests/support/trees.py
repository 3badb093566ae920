"""Describe a directory tree as a container sees it, to compare two unpackers' results."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Any


def describe(root: Path, *, dir_mtimes: bool = False) -> dict[str, dict[str, Any]]:
    """Per path: type, mode bits, uid/gid, size, content sha256, symlink target, hardlink group, xattrs, device
    numbers and mtime (files and symlinks; directories only when ``dir_mtimes``). Hardlinks are identified by the
    first path (in sorted order) of each inode, so two trees compare equal when the same paths share an inode.
    """
    entries: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            entries[str(p.relative_to(root))] = p.lstat()
    first_of_inode: dict[tuple[int, int], str] = {}
    for rel in sorted(entries):
        st = entries[rel]
        if not stat.S_ISDIR(st.st_mode):
            first_of_inode.setdefault((st.st_dev, st.st_ino), rel)
    out: dict[str, dict[str, Any]] = {}
    for rel, st in sorted(entries.items()):
        p = root / rel
        d: dict[str, Any] = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
                             "uid": st.st_uid, "gid": st.st_gid}
        try:
            names = os.listxattr(p, follow_symlinks=False)
        except OSError:
            names = []
        d["xattrs"] = {n: os.getxattr(p, n, follow_symlinks=False) for n in sorted(names)}
        if stat.S_ISREG(st.st_mode):
            d["size"] = st.st_size
            d["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            d["target"] = os.readlink(p)
            del d["mode"]  # always 0777 on Linux
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if not stat.S_ISDIR(st.st_mode):
            d["link_group"] = first_of_inode[(st.st_dev, st.st_ino)]
            d["mtime"] = st.st_mtime_ns
        elif dir_mtimes:
            d["mtime"] = st.st_mtime_ns
        out[rel] = d
    return out


def diff(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[str]:
    """Human-readable differences between two descriptions (empty when equal)."""
    lines = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            lines.append(f"only in second: {k}")
        elif k not in b:
            lines.append(f"only in first: {k}")
        elif a[k] != b[k]:
            fields = {f for f in set(a[k]) | set(b[k]) if a[k].get(f) != b[k].get(f)}
            lines.append(f"{k}: " + ", ".join(f"{f}: {a[k].get(f)!r} != {b[k].get(f)!r}" for f in sorted(fields)))
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
