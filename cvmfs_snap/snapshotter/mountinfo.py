"""Which directories do the mounts of this mount namespace pin? (``/proc/self/mountinfo``)

The snapshotter never deletes a directory its metadata does not know while something may still use it: after a lost
or emptied ``metadata.db`` the directories of running containers are exactly such directories. containerd mounts our
answers in its own (the host's) mount namespace, which is ours too, so a directory is *provably unused* when no
mount in ``/proc/self/mountinfo`` has it (or a path below it) as mount point, bind-mount source, or overlay
``upperdir``/``workdir``/``lowerdir``.

Overlay's ``lowerdir`` may be relative (containerd's ``mount.All`` shortens long options by changing into the
lowerdirs' common parent), so relative entries are resolved against the directories the caller names (our short-link
directory). Short links (``<root>/l/<id>``) are resolved with ``readlink`` only, never ``realpath``: a link may point
into a hung CVMFS mount, and nothing here may block on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
_OVERLAY_PATH_OPTIONS = ("upperdir", "workdir", "lowerdir", "datadir")


def unescape(field: str) -> str:
    """The octal escapes of mountinfo and /proc/mounts (``\\040`` for a space, ``\\134`` for a backslash)."""
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` not preceded by a backslash (overlay escapes ``,`` and ``:`` in paths), unescaping them."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _resolve(path: str, bases: Sequence[Path], link_dirs: Sequence[Path]) -> list[str]:
    """Absolute candidates for one overlay layer path, following our short links one step (readlink)."""
    cands = [path] if path.startswith("/") else [os.path.join(str(b), path) for b in bases]
    out: list[str] = []
    for c in cands:
        c = os.path.normpath(c)
        out.append(c)
        if any(os.path.dirname(c) == str(d) for d in link_dirs):
            try:
                target = os.readlink(c)
            except OSError:
                continue
            out.append(os.path.normpath(os.path.join(os.path.dirname(c), target)))
    return out


def pinned_paths(relative_to: Sequence[Path] = (), link_dirs: Sequence[Path] = (),
                 mountinfo: str = MOUNTINFO) -> set[str]:
    """Every absolute path the current mounts use (see the module doc). Unreadable mountinfo raises OSError."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()
    fs_roots: dict[str, str] = {}  # major:minor -> a mount point where the fs root "/" is mounted
    entries: list[tuple[str, str, str, str, str]] = []
    for line in lines:
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            dev, root, point = fields[2], unescape(fields[3]), unescape(fields[4])
            fstype, options = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        except (ValueError, IndexError):
            log.debug("unparsable mountinfo line %r", line[:200])
            continue
        if root == "/":
            fs_roots.setdefault(dev, point)
        entries.append((dev, root, point, fstype, options))
    pinned: set[str] = set()
    for dev, root, point, fstype, options in entries:
        pinned.add(os.path.normpath(point))
        if root != "/" and dev in fs_roots:  # a bind mount of a directory of that file system
            pinned.add(os.path.normpath(fs_roots[dev].rstrip("/") + root))
        if fstype != "overlay":
            continue
        for opt in (unescape(o) for o in options.split(",")):
            name, eq, value = opt.partition("=")
            if not eq or name not in _OVERLAY_PATH_OPTIONS:
                continue
            layers = _split_unescaped(value, ":") if name in ("lowerdir", "datadir") else [value]
            for p in layers:
                if p:
                    pinned.update(_resolve(p, relative_to, link_dirs))
    return pinned


def is_pinned(path: Path | str, pinned: Iterable[str]) -> bool:
    """True if ``path`` or anything below it is in ``pinned``."""
    p = os.path.normpath(str(path))
    prefix = p.rstrip("/") + "/"
    return any(q == p or q.startswith(prefix) for q in pinned)
