"""The TOC of one lazy layer as an immutable inode tree, presented as overlayfs expects a layer directory.

:func:`build_tree` turns a validated :class:`~cvmfs_snap.estargz.Toc` into :class:`Node`s numbered ``0..n-1``
(0 is the layer's root), so that the layer's directory under the FUSE mount, stacked by overlayfs, equals what
containerd's own overlayfs snapshotter unpacks from the same blob:

- ``dir/.wh.NAME`` becomes a whiteout: a character device 0/0 named ``NAME`` (owner from the entry, mode 0, as
  containerd's ``mknod`` leaves it);
- ``dir/.wh..wh..opq`` is hidden and ``dir`` carries ``trusted.overlay.opaque=y``;
- AUFS bookkeeping (``.wh..wh.plnk/``, ``.wh..wh.aufs``...) is hidden, as containerd skips it;
- hardlinks share their target's node (one inode, ``st_nlink`` counts the names);
- eStargz's own entries at the root (``stargz.index.json``, ``.prefetch.landmark``, ``.no.prefetch.landmark``) are
  hidden, so the tree is the image's tree whatever the path (lazy or CVMFS).

Names and symlink targets are bytes (``surrogateescape`` round trip of the TOC's names). Nothing here does I/O.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from datetime import datetime

from cvmfs_snap.estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, Toc, TocEntry
from cvmfs_snap.layer.whiteout import OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX, aufs_meta_prefix

#: root entries of an eStargz blob that are not image content
HIDDEN_AT_ROOT = frozenset({TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})

_TYPE_BITS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
              "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


def _b(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _mtime_ns(modtime: str, memo: dict[str | int, int] | None = None) -> int:
    """Nanoseconds since the epoch of a TOC ``modtime``; with ``memo``, one int object (and one parse) per
    distinct time: most entries of a layer share a handful of times."""
    if not modtime:
        return 0
    if memo is not None:
        got = memo.get(modtime)
        if got is None:
            got = memo[modtime] = _mtime_ns(modtime)
        return got
    try:
        return int(datetime.fromisoformat(modtime.replace("Z", "+00:00")).timestamp()) * 1_000_000_000
    except (ValueError, OverflowError, OSError):
        return 0


@dataclass(slots=True)
class Node:
    """One inode of a layer: attributes as ``stat`` shows them, a directory's entries, a file's TOC path."""

    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    nlink: int = 1
    #: regular files: the TOC name to read (hardlinks resolved); symlinks: the target
    path: str = ""
    target: bytes = b""
    xattrs: dict[bytes, bytes] | None = None
    #: directories: name -> node index, and the names in readdir order
    entries: dict[bytes, int] | None = None
    names: tuple[bytes, ...] = ()

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass(slots=True)
class Tree:
    """Nodes of one layer by index (0 = root) and the sum of its regular files' sizes (for statfs)."""

    nodes: list[Node]
    file_bytes: int = 0

    def lookup(self, parent: int, name: bytes) -> int | None:
        entries = self.nodes[parent].entries
        return None if entries is None else entries.get(name)

    def walk(self) -> list[tuple[str, int]]:
        """(relative path, node index) of every name below the root, parents before children, iteratively."""
        out: list[tuple[str, int]] = []
        stack: list[tuple[str, int]] = [("", 0)]
        while stack:
            prefix, idx = stack.pop()
            node = self.nodes[idx]
            assert node.entries is not None
            for name in node.names:
                child = node.entries[name]
                rel = prefix + name.decode("utf-8", "surrogateescape")
                out.append((rel, child))
                if self.nodes[child].is_dir:
                    stack.append((rel + "/", child))
        return out


def _node(e: TocEntry, memo: dict[str | int, int] | None = None) -> Node:
    """``memo`` shares the int objects of times and modes between nodes (32 bytes each otherwise)."""
    bits = _TYPE_BITS.get(e.type, stat.S_IFREG)
    mode = bits | (e.mode & 0o7777)
    if memo is not None:
        mode = memo.setdefault(mode, mode)
    n = Node(mode=mode, uid=e.uid, gid=e.gid, mtime_ns=_mtime_ns(e.modtime, memo))
    if e.type == "reg":
        n.size = e.size
        n.path = e.name
    elif e.type == "symlink":
        n.target = _b(e.linkname)
        n.mode = stat.S_IFLNK | 0o777  # as Linux shows every symlink
        n.size = len(n.target)
    elif e.type in ("char", "block"):
        n.rdev = os.makedev(e.devmajor, e.devminor)
    elif e.type == "dir":
        n.entries = {}
        n.nlink = 2
    if e.xattrs:
        n.xattrs = {_b(k): v for k, v in e.xattrs.items()}
    return n


def _hidden(path: str) -> bool:
    if path in HIDDEN_AT_ROOT:
        return True
    return aufs_meta_prefix(path.split("/")) is not None


def build_tree(toc: Toc, now_ns: int | None = None) -> Tree:
    """The layer's tree (see the module docstring). The TOC is validated already (``parse_toc``). Directories the
    TOC leaves out get the time ``now_ns`` (default: now), as containerd's unpack creates them at unpack time."""
    now = time.time_ns() if now_ns is None else now_ns
    listed = {id(e) for e in toc.entries}
    root = _node(toc.by_name.get("") or TocEntry("", "dir", mode=0o755))
    nodes: list[Node] = [root]
    index: dict[str, int] = {"": 0}
    opaque: list[str] = []
    whiteouts: list[tuple[str, TocEntry]] = []
    links: list[str] = []
    # directories first (the TOC lists a parent before its children, but parents it leaves out come last)
    names = sorted((p for p in toc.by_name if p), key=lambda p: (toc.by_name[p].type != "dir", p.count("/"), p))
    file_bytes = 0
    times: dict[str | int, int] = {}
    for path in names:
        if _hidden(path):
            continue
        e = toc.by_name[path]
        base = path.rpartition("/")[2]
        if base == OPAQUE_MARKER:
            opaque.append(path.rpartition("/")[0])
            continue
        if base.startswith(WHITEOUT_PREFIX):
            whiteouts.append((path, e))
            continue
        if e.type == "hardlink":
            links.append(path)
            continue
        index[path] = len(nodes)
        n = _node(e, times)
        if id(e) not in listed:
            n.mtime_ns = now
        nodes.append(n)
        if n.is_reg:
            file_bytes += n.size
    for path, e in whiteouts:
        parent, _, base = path.rpartition("/")
        name = f"{parent}/{base[len(WHITEOUT_PREFIX):]}" if parent else base[len(WHITEOUT_PREFIX):]
        if name in index:
            continue  # the layer deletes and re-creates NAME: containerd's unpack keeps the new one
        index[name] = len(nodes)
        nodes.append(Node(mode=stat.S_IFCHR, uid=e.uid, gid=e.gid, mtime_ns=_mtime_ns(e.modtime, times)))
    # in tar order, each hardlink's own header is applied to the shared inode, as containerd's unpack does
    # (link, then lchown, chmod, chtimes, xattrs on the new name)
    wanted = set(links)
    for e in toc.entries:
        if e.type != "hardlink" or e.name not in wanted or toc.by_name.get(e.name) is not e:
            continue
        target = toc.hardlinks.get(e.name, "")
        if target not in index or nodes[index[target]].is_dir:
            continue
        index[e.name] = index[target]
        n = nodes[index[target]]
        n.nlink += 1
        if not stat.S_ISLNK(n.mode):
            n.mode = stat.S_IFMT(n.mode) | (e.mode & 0o7777)
            n.mtime_ns = _mtime_ns(e.modtime, times)
        n.uid, n.gid = e.uid, e.gid
        if e.xattrs:
            n.xattrs = {**(n.xattrs or {}), **{_b(k): v for k, v in e.xattrs.items()}}
    for path, idx in index.items():
        if not path:
            continue
        parent, _, base = path.rpartition("/")
        pidx = index.get(parent)
        if pidx is None:
            continue  # below a hidden or replaced entry
        p = nodes[pidx]
        if p.entries is None:
            continue
        p.entries[_b(base)] = idx
        if nodes[idx].is_dir and idx != pidx:
            p.nlink += 1
    for d in opaque:
        if d in index and nodes[index[d]].is_dir:
            n = nodes[index[d]]
            n.xattrs = {**(n.xattrs or {}), OPAQUE_XATTR.encode(): b"y"}
    for n in nodes:
        if n.entries is not None:
            n.names = tuple(sorted(n.entries))
    return Tree(nodes, file_bytes)
